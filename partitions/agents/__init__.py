"""Node agents: the kubelet-like tier on the bus. Each runs the pods `schedule` places on its
nodes (`local`: OS processes, `sim`: simulated machines, `kubernetes`: Pods bound to Nodes),
fences stale partition owners, and reports pod events."""
