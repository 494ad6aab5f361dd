"""The process's open-files limit. A gateway with thousands of client connections and node
agents spawning pods share one process in the embedded default; the soft RLIMIT_NOFILE
(often 1024) would run out long before the machine does, so every fnplane entry point
raises it to the hard limit at start. The descriptor budget (activator/listener.py) is
then: client connections up to the gateway's cap, as many to pods while those requests
are proxied, and `ActivatorConfig.fd_reserve` left for pods' pipes and logs, NATS, Redis."""

from __future__ import annotations

import logging
import resource
from pathlib import Path

log = logging.getLogger(__name__)

# What the kernel allows a soft limit to be when the hard limit says "unlimited".
_NR_OPEN = Path("/proc/sys/fs/nr_open")


def open_files_limit() -> int:
    """The soft limit now in force."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_open_files_limit() -> int:
    """Raise the soft limit to the hard one (children inherit it: pods too); return the
    soft limit in force. A refusal leaves the limit as it was, with a warning."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            target = int(_NR_OPEN.read_text())
        except (OSError, ValueError):
            target = 1 << 20
    if target <= soft:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        log.warning("cannot raise the open-files limit from %d to %d: %s", soft, target, exc)
        return soft
    return target
