"""Errors as values at the boundary: every error reply on NATS carries an `ErrorCode`, and the
one table here maps a code to an HTTP status, so the gateway, the CLI and the node agents
agree on what an error means (a 409 used to mean "stale epoch" at one node agent and "pod runs
elsewhere" at another; now they are two codes that happen to share a status).
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    INVALID = "invalid"  # the request is malformed or breaks a rule: do not retry it
    NOT_FOUND = "not_found"  # no such service, node or pod
    CONFLICT = "conflict"  # the request clashes with what exists (a pod runs elsewhere)
    STALE_EPOCH = "stale_epoch"  # the sender's partition map is behind: refresh, then retry
    NO_CAPACITY = "no_capacity"  # no room now; another node or a later try may succeed
    UNAVAILABLE = "unavailable"  # nobody serves it now, or it is shutting down
    TIMEOUT = "timeout"  # no answer within the deadline
    INTERNAL = "internal"  # a bug or an unexpected failure on the other side


HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409,
    ErrorCode.STALE_EPOCH: 409,
    ErrorCode.INTERNAL: 500,
    ErrorCode.NO_CAPACITY: 503,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.TIMEOUT: 504,
}


def http_status(code: ErrorCode) -> int:
    return HTTP_STATUS[code]


class RemoteError(Exception):
    """An error with a code: raised by a handler to answer with it, raised by a caller when
    the other side answered with one."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def status(self) -> int:
        return HTTP_STATUS[self.code]


class NoResponders(RemoteError):
    def __init__(self, subject: str) -> None:
        super().__init__(ErrorCode.UNAVAILABLE, f"nobody serves {subject}")


class RequestTimeout(RemoteError):
    def __init__(self, subject: str, timeout: float) -> None:
        super().__init__(ErrorCode.TIMEOUT, f"no reply on {subject} within {timeout:.1f}s")
