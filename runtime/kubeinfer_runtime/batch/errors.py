"""The failures of a batch process, and the exit status each one means: PURE.

Every failure is a ``RuntimeServiceError`` (the runtime's one error base), so its
``message`` is written for the user (Kubernetes style: names the object, the
record and the field, says the fix) and never quotes a record's bytes: input is
described by object key, record number and byte offset.

Three outcomes matter to Kubernetes, and each class maps to one:

* :class:`BadInput` (``EXIT_BAD_INPUT``): retrying cannot help — a record too
  large, corrupt framing, more bad records than tolerated, a plan that does not
  match the job. The podFailurePolicy fails the index (or the job) at once.
* :class:`ModelUnavailable` (``EXIT_MODEL_FAILED``): the model cannot load or
  never answers ``/ping``: the whole job fails at once.
* anything else (the object store down, a model timing out): exit 1, and the
  Indexed Job retries the index (``backoffLimitPerIndex``); done markers make the
  retry resume.
"""

from __future__ import annotations

from kubeinfer_runtime.contract.batch import EXIT_BAD_INPUT, EXIT_MODEL_FAILED
from kubeinfer_runtime.errors import NotReady, RuntimeServiceError, ValidationError

#: Exit status of every other failure: Kubernetes retries the pod.
EXIT_RETRY = 1


class BadInput(ValidationError):
    """The job's input (or its settings) cannot be processed: retrying cannot help."""


class RecordTooLarge(BadInput):
    """One record is bigger than MaxPayloadInMB allows a request to be."""


class CorruptInput(BadInput):
    """The bytes are not in the declared format (RecordIO/TFRecord framing, gzip)."""


class InputRefused(BadInput):
    """An object may not be read or written: outside the job's folders, not a regular
    file, a key with ``..``."""


class BadRecord(BadInput):
    """One record cannot be filtered, joined or answered; counted against
    ``errorPolicy.maxFailedRecords`` rather than failing the job at once."""


class TooManyFailures(BadInput):
    """More bad records than ``errorPolicy.maxFailedRecords`` tolerates."""


class OutputMismatch(BadInput):
    """The model answered a batch with another number of records than it was sent,
    so outputs cannot be joined with their inputs."""


class ModelUnavailable(NotReady):
    """The model cannot load, fails its warm-up or never answers ``/ping``."""


class StoreFailed(NotReady):
    """The object store failed or refused; another attempt may succeed."""


class Stopped(RuntimeServiceError):
    """SIGTERM arrived: the shard in progress is abandoned (no done marker)."""

    def __init__(self, message: str) -> None:
        super().__init__(503, "Stopped", message)


def exit_code(error: BaseException) -> int:
    """The process's exit status for ``error``."""
    from kubeinfer_runtime.contract.batch import EXIT_STOPPED

    if isinstance(error, BadInput):
        return EXIT_BAD_INPUT
    if isinstance(error, ModelUnavailable):
        return EXIT_MODEL_FAILED
    if isinstance(error, Stopped):
        return EXIT_STOPPED
    return EXIT_RETRY


def describe(key: str, number: int, offset: int, part_start: int = 0) -> str:
    """Where a record is, in words: ``object "k" record 7 (byte offset 120)``.

    A record of a byte-range part that does not start at byte 0 is numbered within
    its part (what came before was read by another shard): its byte offset is exact.
    """
    if part_start:
        return (f'object "{key}" byte offset {offset} (record {number} of the part from '
                f"byte {part_start})")
    return f'object "{key}" record {number} (byte offset {offset})'


def short(text: str, limit: int = 500) -> str:
    """``text`` cut to ``limit`` characters (reports must fit a 4 KiB termination log)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def cap(text: str) -> str:
    """``text`` with its first letter upper case (``str.capitalize`` lowers the rest,
    object keys included)."""
    return text[:1].upper() + text[1:]
