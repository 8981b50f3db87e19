"""Typed errors. Code raises these; one gRPC interceptor maps them to status codes."""


class KVClusterError(Exception):
    """Base of every error kvcluster raises on purpose."""


class InvalidArgument(KVClusterError):
    """Bad input from a caller. The message names the field and the limit."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class ResourceExhausted(KVClusterError):
    """Overload or a full pool: the caller may retry later."""


class RequestFailed(KVClusterError):
    """The engine failed on one request (it alone; its batch carried on). Retrying may succeed."""


class NotFound(KVClusterError):
    """A block or key that is not (or no longer) held. Internally becomes a recompute."""


class Unavailable(KVClusterError):
    """A dependency (store, Redis, prefill service) cannot be reached."""


class IntegrityError(KVClusterError):
    """A block failed its checksum, fingerprint, layout or token check."""


class IncompatibleStores(KVClusterError):
    """A worker's KV layout or fingerprint is held by no live cache store: it refuses to start."""


class UnsupportedModel(KVClusterError):
    """A model file or directory kvcluster cannot serve: its architecture, format or a feature of it."""
