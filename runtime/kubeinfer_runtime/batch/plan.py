"""The ``plan`` step: list the input once and cut it into shards.

The cut is PURE (:func:`cut_shards`): it aims at a few shards per worker
(``SHARDS_PER_INSTANCE`` x InstanceCount, so a slow shard does not hold the job
back), cuts objects larger than a shard into byte-range parts when their records
can be found at any offset (Line, RecordIO, TFRecord; never gzip, never with
MaxPayloadInMB 0, which sends whole parts), and packs small objects together, so
10,000 small objects make a few shards, not 10,000 (an object also weighs
``OBJECT_OVERHEAD_BYTES`` for its requests and its write, so many empty objects
still spread). Keys are sorted: the same input always gives the same plan.

The I/O around it lists the input (every object below an ``S3Prefix`` folder,
one object, or a SageMaker ``ManifestFile``), checks every key (no ``..``, no
absolute keys, manifest entries inside the manifest's prefix), and writes the
plan to ``<output>/_kubeinfer/plan.json`` unless one is there: then that plan is
kept (a retried or re-run job sees the same shards) after checking it was made
for this job's input and output, and that it lists only what listing that input
gives (whoever may write the output folder may rewrite it: workers read its objects
and name outputs by its keys). A manifest in S3 may not name a file:// prefix.
"""

from __future__ import annotations

import math
import posixpath
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
from pydantic import ValidationError as ModelInvalid

from kubeinfer_runtime.batch.errors import BadInput, InputRefused
from kubeinfer_runtime.batch.store import Store, join, key_problem
from kubeinfer_runtime.contract.batch import (
    DONE_FOLDER,
    ERRORS_FOLDER,
    OUTPUT_SUFFIX,
    PARTS_FOLDER,
    PLAN_NAME,
    STATE_FOLDER,
    BatchSettings,
    CompressionType,
    DataType,
    ObjectRef,
    Shard,
    ShardPart,
    ShardPlan,
    SplitType,
)
from kubeinfer_runtime.contract.locations import (
    location_problem,
    normalize_prefix,
    split_location,
    within,
)

SHARDS_PER_INSTANCE = 4
#: A shard holds at least this much (smaller shards cost more in markers than they save).
MIN_SHARD_BYTES = 4 << 20
#: What an object weighs beyond its bytes: its requests, its write, its listing.
OBJECT_OVERHEAD_BYTES = 64 << 10
#: The most shards a plan makes (an Indexed Job's completions; one marker each).
MAX_SHARDS = 10_000
MAX_MANIFEST_BYTES = 64 << 20
MAX_PLAN_BYTES = 256 << 20
#: The longest file name (bytes) and path (bytes, less its NUL) Linux filesystems take.
NAME_MAX = 255
PATH_MAX = 4095
#: The longest S3 object key, in bytes.
S3_KEY_MAX = 1024


def cut_shards(objects: Sequence[ObjectRef], *, instance_count: int, splittable: bool,
               shard_bytes: int | None = None) -> list[Shard]:
    """Shards of ``objects`` (PURE): byte ranges of large splittable objects, packs of
    small ones; every byte of every object in exactly one part. ``shard_bytes``: the
    job's own shard size (else a few shards per worker, at least ``MIN_SHARD_BYTES``)."""
    total = sum(o.size + OBJECT_OVERHEAD_BYTES for o in objects)
    target = max(shard_bytes or max(total / (instance_count * SHARDS_PER_INSTANCE),
                                    MIN_SHARD_BYTES), total / MAX_SHARDS)
    shards: list[list[ShardPart]] = []
    pack: list[ShardPart] = []
    weight = 0.0
    for i, obj in enumerate(objects):
        if splittable and obj.size > target:
            n = math.ceil(obj.size / target)
            step = math.ceil(obj.size / n)
            for start in range(0, obj.size, step):
                shards.append([ShardPart(object=i, start=start,
                                         end=min(start + step, obj.size))])
            continue
        pack.append(ShardPart(object=i, start=0, end=obj.size))
        weight += obj.size + OBJECT_OVERHEAD_BYTES
        if weight >= target:
            shards.append(pack)
            pack, weight = [], 0.0
    if pack:
        shards.append(pack)
    return [Shard(index=n, parts=parts) for n, parts in enumerate(shards)]


def output_problem(objects: Sequence[ObjectRef], shards: Sequence[Shard],
                   folder: str) -> str | None:
    """Why some object's output cannot be written below ``folder``, else None (PURE).

    Checked when planning, so such an input fails the job at once as bad input
    rather than failing a shard's write, which the Indexed Job would retry in
    vain: a name or path too long for the store, or, in a filesystem, an output
    that would have to be a file and a folder at once (``a`` -> ``a.out``,
    ``a.out/b`` -> ``a.out/b.out``; S3 keys may be both, so S3 outputs may).
    """
    split = {p.object for s in shards for p in s.parts
             if not (p.start == 0 and p.end >= objects[p.object].size)}
    scheme, _, base = split_location(folder) or ("", "", "")
    names: dict[str, str] = {}  # output key -> input key
    for i, obj in enumerate(objects):
        name = obj.key + OUTPUT_SUFFIX
        names[name] = obj.key
        # The longest path it takes: a split object's parts wait under _kubeinfer/parts/.
        longest = len((base + (f"{STATE_FOLDER}/{PARTS_FOLDER}/{name}/{0:020d}" if i in split
                               else name)).encode())
        if scheme == "file":
            if max(len(s.encode()) for s in name.split("/")) > NAME_MAX:
                return (f"Input object key {obj.key[:200]!r} is too long for its output "
                        f"{OUTPUT_SUFFIX!r} file: a file name may have {NAME_MAX} bytes (UTF-8), "
                        f"so a key's last segment {NAME_MAX - len(OUTPUT_SUFFIX)} as "
                        f"{OUTPUT_SUFFIX!r} is added: shorten the key")
            if longest > PATH_MAX:
                return (f"Input object key {obj.key[:200]!r} is too long: its output path "
                        f"would be {longest} bytes, over the {PATH_MAX} a file path may have: "
                        "shorten the key, or use a shorter output.uri")
        elif longest > S3_KEY_MAX:
            return (f"Input object key {obj.key[:200]!r} is too long: its output key would be "
                    f"{longest} bytes, over the {S3_KEY_MAX} an S3 key may have: shorten the "
                    "key, or use a shorter output.uri")
    if scheme == "file":
        for name, key in names.items():
            segments = name.split("/")
            for n in range(1, len(segments)):
                other = names.get("/".join(segments[:n]))
                if other is not None:
                    return (f"Input objects {other[:200]!r} and {key[:200]!r} cannot both be "
                            f"answered: output file {other[:200] + OUTPUT_SUFFIX!r} would "
                            f"have to be the folder of {key[:200] + OUTPUT_SUFFIX!r} too: "
                            "rename one of them")
    return None


def output_folder(settings: BatchSettings) -> str:
    """The job's output folder URI, ending in ``/``; BadInput when it cannot be one."""
    problem = location_problem(settings.output_uri, "output.uri")
    folder = normalize_prefix(settings.output_uri) if problem is None else ""
    if folder == "file:///":
        problem = "output.uri is the whole filesystem: name a folder"
    elif folder and normalize_prefix(folder) != folder:
        # normalize_prefix decodes the folder's name: one holding '#', '?' or an escape
        # would no longer name itself, and outputs (keys joined to it) would go elsewhere.
        problem = (f"output.uri {settings.output_uri[:200]!r} names a folder with '#', '?' "
                   "or '%' in its name, which outputs cannot be addressed below: use another "
                   "folder")
    if problem is not None:
        raise BadInput(problem[0].upper() + problem[1:])
    return folder


def state_uri(settings: BatchSettings, *names: str) -> str:
    """``<output>/_kubeinfer/<names...>``."""
    return output_folder(settings) + "/".join((STATE_FOLDER, *names))


def done_uri(settings: BatchSettings, shard: int) -> str:
    """A shard's done marker: its ``ShardReport``, written after all its outputs."""
    return state_uri(settings, DONE_FOLDER, f"{shard}.json")


def errors_uri(settings: BatchSettings, shard: int) -> str:
    """A shard's bad records (``_errors.jsonl`` lines), written before its marker."""
    return state_uri(settings, ERRORS_FOLDER, f"{shard}.jsonl")


def output_uri(folder: str, key: str) -> str:
    """Where an object's output goes: ``<output>/<key>.out``, ``folder`` its URI."""
    return join(folder, key + OUTPUT_SUFFIX)


def part_uri(folder: str, key: str, start: int) -> str:
    """Where the output of a byte-range part of a split object waits for finalize:
    ``<output>/_kubeinfer/parts/<key>.out/<start>``."""
    return join(folder, f"{STATE_FOLDER}/{PARTS_FOLDER}/{key}{OUTPUT_SUFFIX}/{start:020d}")


def input_root(settings: BatchSettings) -> str:
    """The folder input objects are confined to (for a manifest, until it is read)."""
    problem = location_problem(settings.input_uri, "input.uri")
    if problem is not None:
        raise BadInput(problem[0].upper() + problem[1:])
    if settings.input_uri.endswith("/"):
        return normalize_prefix(settings.input_uri)
    return normalize_prefix(settings.input_uri.rsplit("/", 1)[0] or "/")


def list_input(settings: BatchSettings, store: Store) -> list[ObjectRef]:
    """Every input object, sorted by key; BadInput for an empty or hostile input."""
    if settings.data_type is DataType.MANIFEST_FILE:
        objects = _manifest(settings, store)
    else:
        objects = _prefix(settings, store)
    if not objects:
        raise BadInput(f"Input {settings.input_uri} holds no objects: upload the input, or "
                       "fix input.uri")
    return objects


def _prefix(settings: BatchSettings, store: Store) -> list[ObjectRef]:
    uri = settings.input_uri
    if not uri.endswith("/"):
        size = store.size(uri)
        if size is not None:  # one object: its name, decoded, is its output's
            key = posixpath.basename((split_location(uri) or ("", "", uri))[2])
            problem = key_problem(key)
            if problem is not None:
                raise InputRefused(f"Input object name {key[:200]!r} {problem}: rename the "
                                   "object")
            return [ObjectRef(uri=uri, key=key, size=size)]
    folder = normalize_prefix(uri)
    out_folder = output_folder(settings)
    skip = out_folder[len(folder):] if out_folder.startswith(folder) else None
    objects = []
    for key, size in store.list_folder(folder):
        if skip is not None and key.startswith(skip):
            continue  # the job's own outputs, when the output folder is inside the input's
        problem = key_problem(key)
        if problem is not None:
            raise InputRefused(f"Input object key {key[:200]!r} {problem}: rename the object")
        objects.append(ObjectRef(uri=_key_uri(folder, key), key=key, size=size))
    return objects


def _key_uri(folder: str, key: str) -> str:
    """``join(folder, key)``, checked to decode back to ``key`` below ``folder``: the URI
    a worker reads must name the object the plan lists, never a neighbour."""
    uri = join(folder, key)
    base, named = split_location(folder), split_location(uri)
    if base is None or named != (*base[:2], base[2] + key):
        raise InputRefused(f"Input folder {folder[:200]} cannot name object {key[:200]!r} "
                           "exactly (a '#', '?' or '%' in the folder's own name?): rename "
                           "the folder")
    return uri


def _manifest(settings: BatchSettings, store: Store) -> list[ObjectRef]:
    """SageMaker's manifest: ``[{"prefix": "s3://b/p/"}, "rel/key1", ...]``."""
    prefix, keys = _manifest_prefix(settings, store)
    for n, key in enumerate(keys, 2):
        if not isinstance(key, str):
            raise BadInput(f"Manifest {settings.input_uri} entry {n} is not a key: list keys "
                           "as strings, relative to the prefix")
        problem = key_problem(key)
        if problem is not None:
            raise InputRefused(f"Manifest {settings.input_uri} entry {n} {problem}: list keys "
                               "relative to the prefix, without '..'")
        if not within(_key_uri(prefix, key), [prefix]):
            raise InputRefused(f"Manifest {settings.input_uri} entry {n} lies outside its "
                               "prefix: list keys below the prefix")
    if len(set(keys)) != len(keys):
        raise BadInput(f"Manifest {settings.input_uri} lists a key twice: list each once")
    with ThreadPoolExecutor(16) as pool:
        sizes = list(pool.map(lambda k: store.size(_key_uri(prefix, k)), keys))
    objects = []
    for n, (key, size) in enumerate(zip(keys, sizes, strict=True), 2):
        if size is None:
            raise BadInput(f"Manifest {settings.input_uri} entry {n} names no object: upload "
                           "it, or remove it from the manifest")
        objects.append(ObjectRef(uri=_key_uri(prefix, key), key=key, size=size))
    return sorted(objects, key=lambda o: o.key)


def confine(settings: BatchSettings, store: Store) -> None:
    """Let ``store`` read the job's input: its folder, or its manifest's prefix."""
    store.allow(input_root(settings))
    if settings.data_type is DataType.MANIFEST_FILE:
        _manifest_prefix(settings, store)


def _manifest_prefix(settings: BatchSettings, store: Store) -> tuple[str, list[Any]]:
    data = store.read(settings.input_uri, MAX_MANIFEST_BYTES)
    if data is None:
        raise BadInput(f"Manifest {settings.input_uri} does not exist: upload it, or fix "
                       "input.uri")
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise BadInput(f"Manifest {settings.input_uri} is not JSON: write "
                       '[{"prefix": "s3://bucket/prefix/"}, "key1", "key2", ...]') from None
    if (not isinstance(doc, list) or not doc or not isinstance(doc[0], dict)
            or not isinstance(doc[0].get("prefix"), str)):
        raise BadInput(f"Manifest {settings.input_uri} must start with "
                       '{"prefix": "s3://bucket/prefix/"}, then list keys below it')
    prefix_text = doc[0]["prefix"]
    problem = location_problem(prefix_text, "The manifest's prefix")
    if problem is not None:
        raise InputRefused(f"Manifest {settings.input_uri}: {problem}")
    prefix = normalize_prefix(prefix_text)
    if prefix.startswith("file://") and (split_location(settings.input_uri) or ("",))[0] \
            != "file":
        # An S3 manifest naming file:// would have the worker read its own files (a job on
        # Kubernetes may not name file:// input at all; in local mode, the user's files).
        raise InputRefused(f"Manifest {settings.input_uri}: its prefix is a file:// folder, "
                           "which a manifest in S3 may not name (only a file:// manifest "
                           "may): list objects of the object store")
    if prefix == "file:///":
        raise InputRefused(f"Manifest {settings.input_uri}: its prefix is the whole "
                           "filesystem: name the folder that holds the input")
    store.allow(prefix)
    return prefix, doc[1:]


def splittable(settings: BatchSettings) -> bool:
    """Whether objects may be cut into byte ranges (records findable at any offset)."""
    return (settings.split_type is not SplitType.NONE
            and settings.compression is CompressionType.NONE
            and settings.effective_max_payload_bytes > 0)


def make_plan(settings: BatchSettings, store: Store) -> ShardPlan:
    """Read the job's plan, or list the input, cut it and write it."""
    uri = state_uri(settings, PLAN_NAME)
    existing = read_plan(settings, store)
    if existing is not None:
        return existing
    objects = list_input(settings, store)
    shards = cut_shards(objects, instance_count=settings.instance_count,
                        splittable=splittable(settings), shard_bytes=settings.shard_bytes)
    problem = output_problem(objects, shards, output_folder(settings))
    if problem is not None:
        raise InputRefused(problem)
    plan = ShardPlan(job=settings.job, input_uri=settings.input_uri,
                     output_uri=settings.output_uri, split_type=settings.split_type,
                     compression=settings.compression, objects=objects, shards=shards)
    store.write_bytes(uri, plan.model_dump_json().encode(), "application/json")
    return plan


def read_plan(settings: BatchSettings, store: Store) -> ShardPlan | None:
    """The plan written for this job, None when there is none; BadInput when the one
    there was made for another input, output or split."""
    uri = state_uri(settings, PLAN_NAME)
    data = store.read(uri, MAX_PLAN_BYTES)
    if data is None:
        return None
    try:
        plan = ShardPlan.model_validate_json(data)
    except ModelInvalid:
        raise BadInput(f"Plan {uri} is not a plan this version reads: delete "
                       f"{state_uri(settings)}/ to plan the job again") from None
    mine = (settings.input_uri, settings.output_uri, settings.split_type, settings.compression)
    theirs = (plan.input_uri, plan.output_uri, plan.split_type, plan.compression)
    if mine != theirs:
        raise BadInput(f"Output {output_folder(settings)} holds the plan of another job (input "
                       f"{plan.input_uri}, splitType {plan.split_type.value}, compression "
                       f"{plan.compression.value}): use another output.uri, or delete "
                       f"{state_uri(settings)}/ to start this job over")
    problem = _foreign_object(settings, plan, store)
    if problem is not None:
        raise InputRefused(f"Plan {uri} {problem}, which this job's input does not: delete "
                           f"{state_uri(settings)}/ to plan the job again")
    return plan


def _foreign_object(settings: BatchSettings, plan: ShardPlan, store: Store) -> str | None:
    """What ``plan`` lists that listing this job's input could not have (None: nothing).

    The plan is read back from the output folder, which whoever may write there may
    rewrite: its objects are read and their keys name the outputs, so each must be the
    input object itself or a plain key below the input's folder (or the manifest's
    prefix), exactly as the planner derives them.
    """
    if settings.data_type is DataType.MANIFEST_FILE:
        folder = _manifest_prefix(settings, store)[0]
    else:
        try:
            folder = normalize_prefix(settings.input_uri)
        except ValueError:  # not a folder the planner could list: one object at most
            folder = ""
    for obj in plan.objects:
        problem = key_problem(obj.key)
        if problem is not None:
            return f"lists an object whose key {obj.key[:200]!r} {problem}"
        if (not folder or obj.uri != join(folder, obj.key)) and not (
                settings.data_type is DataType.S3_PREFIX and obj.uri == settings.input_uri):
            return f"lists object {obj.uri[:200]!r}"
    return None
