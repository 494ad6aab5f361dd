"""NATS subjects, in one place so every component agrees on the wiring of DESIGN.md."""

PREFIX = "fnplane"

# activator → scale (demand at once, and on every metrics tick)
DEMAND = f"{PREFIX}.scale.demand"
# scale → schedule (request-reply, queue group "schedule")
PLACE = f"{PREFIX}.schedule.place"
# schedule → schedule: reserve in another partition (request-reply to its owner)
RESERVE = f"{PREFIX}.schedule.reserve"  # + ".{partition}"
# schedule → node backend (request-reply)
NODE = f"{PREFIX}.node"  # + ".{node}.start" / ".{node}.stop"
NODE_REGISTER = f"{PREFIX}.node.register"
NODE_INVENTORY = f"{PREFIX}.nodes.inventory"
# schedule → schedule: low-rate broadcast of partition summaries for probe caches
SUMMARIES = f"{PREFIX}.schedule.summary"
# node backend → everyone
POD_EVENTS = f"{PREFIX}.pod.events"  # + ".{service}"
# route → activators
ENDPOINTS = f"{PREFIX}.route.endpoints"  # + ".{service}"
ROUTE_SNAPSHOT = f"{PREFIX}.route.snapshot"
# activator → registry
COLD_START = f"{PREFIX}.coldstart"
# instances → coordinator
HEARTBEAT = f"{PREFIX}.heartbeat"  # + ".{kind}"
# coordinator → instances
PARTITIONS = f"{PREFIX}.coord.partitions"
PARTITIONS_GET = f"{PREFIX}.coord.partitions.get"
# service registry (admin API, CLI ↔ coordinator) and its change feed
ADMIN = f"{PREFIX}.admin"  # + ".deploy" / ".delete" / ".list" / ".describe" / ".status"
SPEC_EVENTS = f"{PREFIX}.service.events"
SCALE_STATUS = f"{PREFIX}.scale.status"
# scale → route: proxy/direct mode of a service
MODE = f"{PREFIX}.scale.mode"
# scheduler baselines of the benchmark (functions/schedule/baselines.py): same PlaceRequest
PLACE_CENTRAL = f"{PREFIX}.schedule.central.place"
PLACE_SAMPLING = f"{PREFIX}.schedule.sampling.place"
# StartPod header of the sampling baseline: the node admits the pod only if it fits there
# (a Sparrow-like scheduler has no authoritative view, so the node is the last check)
ADMIT_IF_FITS = "Fnplane-Admit-If-Fits"


def node_start(node: str) -> str:
    return f"{NODE}.{node}.start"


def node_stop(node: str) -> str:
    return f"{NODE}.{node}.stop"


def node_probe(node: str) -> str:
    """Sampling baseline → node backend (request-reply): Empty → NodeFree."""
    return f"{NODE}.{node}.probe"


def reserve(partition: int) -> str:
    return f"{RESERVE}.{partition}"


INVOKE = "svc.invoke"  # + ".{service}": request-reply ingress, queue group "activator"
EVENTS = "svc.events"  # + ".{service}": fire-and-forget events, one JetStream stream each


def invoke(service: str) -> str:
    """NATS request-reply ingress of a service (issue 4), named as DESIGN.md."""
    return f"{INVOKE}.{service}"


def events(service: str) -> str:
    """JetStream events of a service (issue 4), answered on `Fnplane-Reply-To` if given."""
    return f"{EVENTS}.{service}"
