"""The appliance's own exception types, and their one mapping to gRPC status codes.

Every error a user can cause is one of these; the control services turn them into gRPC statuses
(never UNKNOWN) and the CLI prints their message on one line.
"""

from __future__ import annotations

from grpclib.const import Status
from grpclib.exceptions import GRPCError

# A status message goes out in the `grpc-message` header, which grpclib's pure-Python hpack encodes
# on the event loop: an error that echoed a 1 MB field froze the appliance for a minute. No message
# leaves longer than this, whatever it quotes.
MAX_STATUS_MESSAGE = 300


class ApplianceError(Exception):
    """Base class: a message fit to show a user, and the gRPC status it maps to."""

    status: Status = Status.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ApplianceError):
    status = Status.INVALID_ARGUMENT


class Unauthenticated(ApplianceError):
    status = Status.UNAUTHENTICATED


class PermissionDenied(ApplianceError):
    status = Status.PERMISSION_DENIED


class NotFound(ApplianceError):
    status = Status.NOT_FOUND


class AlreadyExists(ApplianceError):
    status = Status.ALREADY_EXISTS


class ResourceExhausted(ApplianceError):
    status = Status.RESOURCE_EXHAUSTED


class FailedPrecondition(ApplianceError):
    status = Status.FAILED_PRECONDITION


class Unavailable(ApplianceError):
    status = Status.UNAVAILABLE


class DeadlineExceeded(ApplianceError):
    status = Status.DEADLINE_EXCEEDED


class Internal(ApplianceError):
    status = Status.INTERNAL


_BY_STATUS: dict[Status, type[ApplianceError]] = {
    cls.status: cls
    for cls in (
        InvalidArgument,
        Unauthenticated,
        PermissionDenied,
        NotFound,
        AlreadyExists,
        ResourceExhausted,
        FailedPrecondition,
        Unavailable,
        DeadlineExceeded,
        Internal,
    )
}


def from_status(status: Status, message: str) -> ApplianceError:
    """The exception matching a gRPC status received from another appliance."""
    return _BY_STATUS.get(status, Internal)(message)


def to_grpc(exc: ApplianceError) -> GRPCError:
    """The gRPC error a client receives for `exc`: its status, and its message cut to a bounded size."""
    message = exc.message
    if len(message) > MAX_STATUS_MESSAGE:
        message = message[: MAX_STATUS_MESSAGE - 15] + "… (truncated)"
    return GRPCError(exc.status, message)
