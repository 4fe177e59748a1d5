"""Domain errors shared by the engine and everything above it.

They carry no transport detail; `distserve.rpc.errors` maps each class to one gRPC status code at
the service boundary.
"""

from __future__ import annotations


class DistserveError(Exception):
    """Base of every error the suite raises on purpose."""


class InvalidRequest(DistserveError):
    """The request itself is wrong (a field out of range); retrying it cannot help."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(DistserveError):
    """An id (request, KV lease, worker) that is unknown or already gone."""


class ResourceExhausted(DistserveError):
    """A queue or the KV cache is full; the caller may retry later or elsewhere."""


class Unavailable(DistserveError):
    """A peer or a transfer failed; another worker may succeed."""


class DeadlineExceeded(DistserveError):
    """The request's deadline passed before it finished."""


class Cancelled(DistserveError):
    """The request was cancelled by its caller."""


class Unauthenticated(DistserveError):
    """The caller gave no valid credentials (an API key)."""


class PermissionDenied(DistserveError):
    """The caller is known but may not do this (a certificate of another role, a peer not registered)."""
