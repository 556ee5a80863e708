"""The operator's error base class and its kinds.

Handlers map ``SpecError`` to an InvalidSpec condition plus ``kopf.PermanentError``
(retrying cannot fix a bad spec) and ``ClusterError`` to ``kopf.TemporaryError``.
"""


class KubeinferError(Exception):
    """Base of every error the operator and CLI raise on purpose."""


class SpecError(KubeinferError):
    """The resource's spec is invalid; the message names the field and the fix."""


class ClusterError(KubeinferError):
    """A transient failure talking to the cluster; retry with backoff."""


class LocalRunError(KubeinferError):
    """Local mode could not start or manage a process."""


class ConflictError(ClusterError):
    """A name the operator needs is taken by an object it does not own (retried: often a
    deleted namesake's, not garbage-collected yet)."""
