"""Batch Transform's contract: the settings of batch processes, the shard plan, the reports.

A ``TransformJob`` runs in three steps, each a process (a Kubernetes Job's pod,
or a local process), all reading ``BatchSettings`` from ``KUBEINFER_*`` env:

1. ``kubeinfer-runtime batch plan``: lists the input once, cuts it into shards
   (``ShardPlan``) and writes the plan to ``<output>/_kubeinfer/plan.json``
   (an existing plan is kept: a re-run sees the same shards). It reports a
   ``PlanReport`` (shard count) in its termination message, from which the
   operator sizes the workers' Indexed Job.
2. ``kubeinfer-runtime batch work``: processes the shards ``KUBEINFER_SHARDS``
   selects (one Indexed Job index, ``JOB_COMPLETION_INDEX``; or ``i/n``, every
   n-th from i, locally). Each finished shard leaves a done marker
   (``<output>/_kubeinfer/done/<shard>.json``, a ``ShardReport``) and is skipped
   by any later run; bad records go to ``_kubeinfer/errors/<shard>.jsonl``. It
   reports a ``WorkerReport`` in its termination message.
3. ``kubeinfer-runtime batch finalize``: when every shard is done, assembles
   objects split over several shards, merges the error records into
   ``<output>/_errors.jsonl``, writes ``_kubeinfer/summary.json`` and reports the
   ``JobSummary``; it exits ``EXIT_BAD_INPUT`` when more records failed than
   ``max_failed_records`` allows.

The operator imports this module (the reports it reads, the settings it
renders, the exit codes its podFailurePolicy names), so it stays free of heavy
dependencies.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from kubeinfer_runtime.contract import ModelServerSettings

#: Exit status of a batch process whose input is bad (a record too large, too many
#: bad records): retrying cannot help. The workers' podFailurePolicy fails that
#: index at once; the finalizer's fails the job.
EXIT_BAD_INPUT = 42
#: Exit status of a batch process whose model cannot load (or fails its warm-up):
#: the whole job fails at once, not after minutes of retries.
EXIT_MODEL_FAILED = 43
#: Where a process writes its report (Kubernetes reads at most 4 KiB of it).
TERMINATION_LOG = "/dev/termination-log"
#: Folder of the job's own files under the output prefix.
STATE_FOLDER = "_kubeinfer"
PLAN_NAME = "plan.json"
SUMMARY_NAME = "summary.json"
#: The merged bad records, under the output prefix (``errorPolicy.maxFailedRecords``).
ERRORS_NAME = "_errors.jsonl"
#: What an output object's key adds to its input object's.
OUTPUT_SUFFIX = ".out"
#: Under ``STATE_FOLDER``: one done marker per finished shard (``done/<shard>.json``).
DONE_FOLDER = "done"
#: Under ``STATE_FOLDER``: the bad records of each finished shard (``errors/<shard>.jsonl``).
ERRORS_FOLDER = "errors"
#: Under ``STATE_FOLDER``: the outputs of byte-range parts of objects split over several
#: shards (``parts/<key>.out/<start, 20 digits>``), concatenated by the finalizer.
PARTS_FOLDER = "parts"
#: Exit status of a worker stopped by SIGTERM before it finished its shards.
EXIT_STOPPED = 143
#: SageMaker's largest MaxPayloadInMB.
MAX_PAYLOAD_MB = 100
#: The default request body bound (MaxPayloadInMB 6).
DEFAULT_MAX_PAYLOAD_BYTES = 6 * 1024 * 1024
DEFAULT_MAX_CONCURRENT_TRANSFORMS = 1


class SplitType(StrEnum):
    """How an input object is cut into records (SageMaker SplitType)."""

    NONE = "None"
    LINE = "Line"
    RECORDIO = "RecordIO"
    TFRECORD = "TFRecord"


class CompressionType(StrEnum):
    NONE = "None"
    GZIP = "Gzip"


class DataType(StrEnum):
    """What ``input.uri`` names (SageMaker S3DataType)."""

    #: Every object under the prefix (or the one object it names).
    S3_PREFIX = "S3Prefix"
    #: A manifest file listing objects: SageMaker's JSON
    #: ``[{"prefix": "s3://b/p/"}, "rel/key1", "rel/key2", ...]``.
    MANIFEST_FILE = "ManifestFile"


class BatchStrategy(StrEnum):
    #: As many records per request as fit in ``maxPayloadInMB``.
    MULTI_RECORD = "MultiRecord"
    SINGLE_RECORD = "SingleRecord"


class AssembleWith(StrEnum):
    #: Output records concatenated as the model answered them.
    NONE = "None"
    #: One output record per line.
    LINE = "Line"


class JoinSource(StrEnum):
    NONE = "None"
    #: Each output record joined with its input record (SageMaker's semantics:
    #: CSV columns appended; JSON ``SageMakerOutput`` added, or the
    #: ``SageMakerInput``/``SageMakerOutput`` wrapper when the input is not an object).
    INPUT = "Input"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_shard_selector(selector: str) -> tuple[int, int] | None:
    """``"all"`` -> None; ``"3"`` -> (3, 0) (that one index); ``"i/n"`` -> (i, n), every
    n-th shard from i. Raises ValueError naming the accepted forms."""
    text = selector.strip()
    if text == "all":
        return None
    first, sep, second = text.partition("/")
    try:
        index = int(first)
        step = int(second) if sep else 0
    except ValueError:
        raise ValueError(f"shard selector {selector[:40]!r} must be all, an index (3) or "
                         "i/n (every n-th shard from i)") from None
    if index < 0 or (sep and not 0 <= index < step):
        raise ValueError(f"shard selector {selector[:40]!r} is out of range: an index is "
                         ">= 0, and i/n needs 0 <= i < n")
    return index, step


def select_shards(selector: str, total: int) -> list[int]:
    """The shard indexes a worker takes out of ``total`` (an index past the end: none)."""
    parsed = parse_shard_selector(selector)
    if parsed is None:
        return list(range(total))
    index, step = parsed
    if step == 0:
        return [index] if index < total else []
    return list(range(index, total, step))


#: Input content types whose records DataProcessing can filter and join.
FILTERABLE_TYPES = frozenset({"text/csv", "application/json", "application/jsonlines",
                              "application/jsonl", "application/x-jsonlines",
                              "application/x-ndjson"})
#: Answers that carry one line per record of the request (``batch_across_objects``).
LINE_PER_RECORD_TYPES = frozenset({"text/csv", "application/jsonlines", "application/jsonl",
                                   "application/x-jsonlines", "application/x-ndjson"})


def media_type_of(content_type: str | None) -> str:
    """``"Text/CSV; charset=utf-8"`` -> ``"text/csv"``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


# -- the plan ----------------------------------------------------------------------------


class ObjectRef(_Strict):
    """One input object."""

    uri: str
    #: Its key relative to the input prefix: mirrored under the output prefix.
    key: str
    size: int = Field(ge=0)


class ShardPart(_Strict):
    """A byte range of one object: ``[start, end)`` of its stored bytes.

    A record belongs to the part holding its first byte: a part that does not
    start at 0 skips to the first record boundary at or after ``start``, and
    reads past ``end`` to finish its last record.
    """

    object: int = Field(ge=0)
    start: int = Field(ge=0)
    end: int = Field(ge=0)


class Shard(_Strict):
    index: int = Field(ge=0)
    parts: list[ShardPart]


class ShardPlan(_Strict):
    """Every shard of a job; written once, read by every worker and retry."""

    version: int = 1
    job: str
    input_uri: str
    output_uri: str
    #: How the plan was cut: byte-range parts are aligned to this split's records, so a
    #: re-run with another SplitType or compression must not reuse the plan.
    split_type: SplitType = SplitType.NONE
    compression: CompressionType = CompressionType.NONE
    objects: list[ObjectRef]
    shards: list[Shard]

    def output_key(self, obj: ObjectRef) -> str:
        return obj.key + OUTPUT_SUFFIX


# -- the reports -------------------------------------------------------------------------


class PlanReport(_Strict):
    """What ``batch plan`` reports (its termination message)."""

    shards: int = Field(ge=0)
    objects: int = Field(ge=0)
    bytes: int = Field(ge=0)


class ShardReport(_Strict):
    """One finished shard's counters (its done marker's content)."""

    shard: int
    records: int = 0
    failed_records: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    #: Records of each byte-range part of an object split over several shards, keyed
    #: ``"<object index>:<start>"``: the finalizer adds them up to number the bad
    #: records of later parts within their whole object.
    part_records: dict[str, int] = Field(default_factory=dict)


class WorkerReport(_Strict):
    """What ``batch work`` reports: the shards it finished in this run, summed.

    The same model is its running progress: locally the worker rewrites
    ``progress_file`` with it (atomically, at most twice a second, and at exit).
    """

    #: Shards this worker was given by ``KUBEINFER_SHARDS``.
    shards_assigned: int = 0
    #: Shards it began processing in this run (done or not): resume counts re-work with it.
    shards_started: int = 0
    shards_done: int = 0
    shards_skipped: int = 0
    records: int = 0
    failed_records: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    #: Why it exited non-zero (no record bytes, ever).
    error: str = ""


class JobSummary(_Strict):
    """What ``batch finalize`` reports and writes to ``_kubeinfer/summary.json``."""

    objects: int = 0
    shards: int = 0
    records: int = 0
    failed_records: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    failed: bool = False
    #: Kubernetes-style reason and message when ``failed``.
    reason: str = ""
    message: str = ""


# -- the settings ------------------------------------------------------------------------


class BatchSettings(ModelServerSettings):
    """Settings of every batch process: the model server's (the model, threads, S3),
    plus the job's. The model is one of ``model_uri`` (in-process), ``pipeline``
    (in-process steps) or ``model_url`` (an image speaking the SageMaker container
    contract on localhost: the pod's other container)."""

    #: The model's source is optional here: ``model_url`` may stand for it.
    model_uri: str = ""
    job: str = ""
    input_uri: str = ""
    input_content_type: str = "application/json"
    split_type: SplitType = SplitType.NONE
    compression: CompressionType = CompressionType.NONE
    data_type: DataType = DataType.S3_PREFIX
    output_uri: str = ""
    accept: str = ""
    assemble_with: AssembleWith = AssembleWith.NONE
    #: BatchStrategy, MaxPayloadInMB and MaxConcurrentTransforms are optional, as in
    #: CreateTransformJob: None (leave the variable out) lets an image model's
    #: ``GET /execution-parameters`` answer decide, else the defaults apply
    #: (MultiRecord, 6 MB, 1). The ``effective_*`` properties say what a worker uses.
    batch_strategy: BatchStrategy | None = None
    #: Largest request body, bytes (MaxPayloadInMB); 0: the whole object in one.
    max_batch_payload_bytes: int | None = Field(default=None, ge=0,
                                                le=MAX_PAYLOAD_MB * 1024 * 1024)
    #: Requests in flight per worker (MaxConcurrentTransforms).
    max_concurrent_transforms: int | None = Field(default=None, ge=1, le=1024)
    #: Small objects' records may share MultiRecord requests when each record's output
    #: is one line (Line split, AssembleWith Line, a line-per-record Accept): their
    #: outputs are then what one request per object gives. SageMaker never does it.
    batch_across_objects: bool = True
    #: Per request (ModelClientConfig).
    invocation_timeout_s: float = Field(default=600.0, gt=0)
    invocation_retries: int = Field(default=3, ge=0, le=10)
    input_filter: str = "$"
    join_source: JoinSource = JoinSource.NONE
    output_filter: str = "$"
    #: Bad records tolerated across the job (0: the first fails it).
    max_failed_records: int = Field(default=0, ge=0)
    #: Parallel workers (InstanceCount): the planner aims at a few shards each.
    instance_count: int = Field(default=1, ge=1)
    #: Bytes of input per shard; None: a few shards per worker, each at least 4 MiB.
    #: Smaller shards resume with less re-work after a crash, and cost a marker each.
    shard_bytes: int | None = Field(default=None, ge=1)
    #: An image model's URL (``http://127.0.0.1:8081``), when it is not run in-process.
    model_url: str | None = None
    #: Which shards this worker takes: "all", one index ("3"), or "i/n" (every n-th).
    #: On Kubernetes the Indexed Job's ``JOB_COMPLETION_INDEX``, which wins over
    #: ``KUBEINFER_SHARDS`` (so a rendered ``KUBEINFER_SHARDS=all`` cannot make every
    #: pod of the Indexed Job take every shard).
    shards: Annotated[str, Field(validation_alias=AliasChoices(
        "JOB_COMPLETION_INDEX", "KUBEINFER_SHARDS"))] = "all"
    #: Local mode: a JSON file the worker rewrites with its running counters.
    progress_file: str | None = None
    #: Where the report goes (Kubernetes reads the termination log).
    report_file: str = TERMINATION_LOG
    #: Local mode: the step is started before it may run (a worker while the plan is
    #: made, the finalizer while the workers run) so that its imports overlap the step
    #: before; it waits for a line on stdin to go on, and exits ``EXIT_STOPPED`` on EOF.
    start_gate: bool = False
    #: How long the model may take to load and answer (in-process: fetch, load and
    #: warm-up; image: ``GET /ping`` answering 200), seconds; then the worker exits
    #: ``EXIT_MODEL_FAILED``.
    startup_timeout_s: float = Field(default=300.0, gt=0)

    @field_validator("shards")
    @classmethod
    def _shard_selector(cls, v: str) -> str:
        parse_shard_selector(v)
        return v

    @property
    def effective_batch_strategy(self) -> BatchStrategy:
        return self.batch_strategy or BatchStrategy.MULTI_RECORD

    @property
    def effective_max_payload_bytes(self) -> int:
        if self.max_batch_payload_bytes is None:
            return DEFAULT_MAX_PAYLOAD_BYTES
        return self.max_batch_payload_bytes

    @property
    def effective_max_concurrent_transforms(self) -> int:
        return self.max_concurrent_transforms or DEFAULT_MAX_CONCURRENT_TRANSFORMS

    @property
    def data_processing(self) -> bool:
        """Whether records are filtered or joined (SageMaker DataProcessing)."""
        return (self.input_filter.strip() != "$" or self.output_filter.strip() != "$"
                or self.join_source is JoinSource.INPUT)

    def problems(self) -> list[str]:
        """Combinations no job can run, each a message naming the fields and the fix
        (the worker refuses to start on any; the operator can refuse the spec)."""
        out: list[str] = []
        media = media_type_of(self.input_content_type)
        if self.data_processing:
            if media not in FILTERABLE_TYPES:
                out.append(f"DataProcessing filters and joinSource need input.contentType "
                           f"text/csv, application/json or application/jsonlines, not "
                           f"{self.input_content_type[:60]!r}: remove them or convert the input")
            if self.split_type in (SplitType.RECORDIO, SplitType.TFRECORD):
                out.append(f"DataProcessing filters and joinSource work on CSV and JSON records, "
                           f"not on input.splitType {self.split_type.value}: remove them")
            elif self.split_type is SplitType.NONE and media == "text/csv":
                out.append("DataProcessing filters and joinSource on text/csv need "
                           "input.splitType Line (each line is one record): set it")
        if (self.join_source is JoinSource.INPUT and media == "text/csv"
                and media_type_of(self.accept) not in ("", "text/csv")):
            out.append("DataProcessing joinSource Input appends output columns to CSV rows: set "
                       "output.accept text/csv")
        per_record = (self.output_filter.strip() != "$" or self.join_source is JoinSource.INPUT)
        if (per_record and self.split_type is SplitType.LINE
                and self.assemble_with is not AssembleWith.LINE):
            out.append("DataProcessing joinSource Input and outputFilter write one output record "
                       "per input line: set output.assembleWith Line")
        return out

    def sagemaker_env(self) -> dict[str, str]:
        """The ``SAGEMAKER_*`` variables SageMaker gives a batch transform's model
        container: render them into an image model's container (``model_url``)."""
        return {
            "SAGEMAKER_BATCH": "true",
            "SAGEMAKER_MAX_PAYLOAD_IN_MB": str(-(-self.effective_max_payload_bytes
                                                 // (1024 * 1024))),
            "SAGEMAKER_BATCH_STRATEGY": ("SINGLE_RECORD" if self.effective_batch_strategy
                                         is BatchStrategy.SINGLE_RECORD else "MULTI_RECORD"),
            "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS": str(self.effective_max_concurrent_transforms),
        }

    def _one_source(self) -> BatchSettings:  # type: ignore[override]
        # Replaces the model server's rule: a batch model may also be an image.
        given = [bool(self.model_uri), self.multi_model_prefix is not None,
                 self.pipeline is not None, self.model_url is not None]
        if sum(given) != 1:
            raise ValueError("set exactly one of KUBEINFER_MODEL_URI, KUBEINFER_PIPELINE or "
                             "KUBEINFER_MODEL_URL")
        return self
