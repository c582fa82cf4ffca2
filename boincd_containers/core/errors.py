"""One exception family for the whole daemon.

Engine errors are translated into these at the adapter, so nothing else has to
know about aiodocker, and the API can turn any of them into a JSON error with a
stable code and a retryable flag.
"""

from __future__ import annotations


class BoincdError(Exception):
    """Root of every error the daemon reports on purpose."""

    code = "internal"
    http_status = 500
    default_retryable = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = self.default_retryable if retryable is None else retryable

    def to_json(self) -> dict[str, object]:
        return {"error": {"code": self.code, "message": self.message, "retryable": self.retryable}}


class BadRequest(BoincdError):
    code = "bad_request"
    http_status = 400


class Forbidden(BoincdError):
    code = "forbidden"
    http_status = 403


class NotFound(BoincdError):
    code = "not_found"
    http_status = 404


class Conflict(BoincdError):
    code = "conflict"
    http_status = 409


class Unavailable(BoincdError):
    """The engine (or something it needs, like a registry) cannot be reached now."""

    code = "unavailable"
    http_status = 503
    default_retryable = True


class ImageError(BoincdError):
    """An image cannot be pulled, loaded or built: the task cannot run with it."""

    code = "image_error"
    http_status = 422


class ResourceBusy(BoincdError):
    """A resource the task needs (a GPU share) is taken now; try again later."""

    code = "busy"
    http_status = 409
    default_retryable = True


class NetworkSuspended(BoincdError):
    """The task needs the network (a pull) while BOINC has network activity suspended."""

    code = "network_suspended"
    http_status = 409
    default_retryable = True


class StateWriteError(Unavailable):
    """A file of the daemon's state dir cannot be written (disk full, read-only).

    Retryable: what was to be saved is kept in memory and written with the next
    change that succeeds; the volunteer can free space meanwhile.
    """

    code = "state_write_failed"


class EngineRefused(BoincdError):
    """The engine refused the container for good (e.g. the OCI runtime cannot set it
    up: a mount over /proc): no retry can succeed, so the task fails with the
    engine's own message."""

    code = "engine_refused"
    http_status = 422
