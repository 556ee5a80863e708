"""Object keys into URIs and paths: a key names exactly its object, and a key whose object
or output cannot be read or written is refused when planning, as bad input (not retried).

Keys are names: ``#``, ``?`` and ``%41`` are characters of the name, not URI syntax, and
``%2e%2e`` is a folder called that, never a way out of the input or output folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from kubeinfer_runtime.batch import plan as plan_module
from kubeinfer_runtime.batch.errors import BadInput, InputRefused, exit_code
from kubeinfer_runtime.batch.plan import (
    input_root,
    make_plan,
    output_folder,
    output_problem,
    output_uri,
    part_uri,
)
from kubeinfer_runtime.batch.store import TEMP_PREFIX, Store, join, key_problem
from kubeinfer_runtime.contract.batch import (
    EXIT_BAD_INPUT,
    BatchSettings,
    ObjectRef,
    Shard,
    ShardPart,
)
from kubeinfer_runtime.contract.locations import split_location, within
from tests.support.onnx_models import row_sum_model
from tests.unit.test_batch_golden import CSV, run_job

#: Legal keys that a URI would read as a fragment, a query or an escape if pasted raw.
AWKWARD = ["a#b.csv", "q?x.csv", "100%41.csv", "a", "sp ace+plus.csv", "é/ü.csv",
           "%2e%2e/x.csv", "semi;colon=1&b.csv"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return row_sum_model(tmp_path_factory.mktemp("model") / "sum.onnx")


def _settings(tmp: Path, **kw: object) -> BatchSettings:
    base: dict[str, object] = dict(model_url="http://127.0.0.1:1",
                                   input_uri=f"file://{tmp}/in/",
                                   output_uri=f"file://{tmp}/out/")
    base.update(kw)
    return BatchSettings(**base)


def _store(s: BatchSettings) -> Store:
    return Store(s.s3(), file_roots=[input_root(s), output_folder(s)])


def _refused(s: BatchSettings, match: str) -> InputRefused:
    with pytest.raises(InputRefused, match=match) as e:
        make_plan(s, _store(s))
    assert exit_code(e.value) == EXIT_BAD_INPUT  # a failed index, not a retry
    return e.value


# -- keys into URIs ---------------------------------------------------------------------


@pytest.mark.parametrize("key", AWKWARD)
def test_every_key_decodes_back_to_itself_in_s3_and_file_uris(key: str) -> None:
    assert split_location(join("s3://b/in/", key)) == ("s3", "b", "in/" + key)
    assert split_location(join("s3://b/", key)) == ("s3", "b", key)
    assert split_location(join("file:///d/in/", key)) == ("file", "", "/d/in/" + key)
    assert split_location(output_uri("file:///d/out/", key)) == (
        "file", "", f"/d/out/{key}.out")
    assert split_location(part_uri("s3://b/out/", key, 7)) == (
        "s3", "b", f"out/_kubeinfer/parts/{key}.out/{7:020d}")
    assert within(join("file:///d/in/", key), ["file:///d/in/"])


def test_awkward_keys_read_and_write_their_own_objects(tmp_path: Path, model: Path) -> None:
    files = {key: f"{n},1\n".encode() for n, key in enumerate(AWKWARD)}
    outputs, summary, _ = run_job(tmp_path, model, files, split_type="Line",
                                  input_content_type=CSV, accept=CSV, assemble_with="Line")
    assert outputs == {f"{key}.out": f"{n + 1}.0\n".encode() for n, key in enumerate(AWKWARD)}
    assert summary.objects == len(AWKWARD)


def test_awkward_keys_cut_over_shards_come_back_whole(tmp_path: Path, model: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Parts wait under _kubeinfer/parts/<key>.out/: pasted raw, every part of "a#b.csv"
    # would be written to parts/a, over each other.
    monkeypatch.setattr(plan_module, "MIN_SHARD_BYTES", 64)
    monkeypatch.setattr(plan_module, "OBJECT_OVERHEAD_BYTES", 0)
    data = "".join(f"{i},{i + 1}\n" for i in range(100)).encode()
    outputs, summary, _ = run_job(
        tmp_path, model, {"a#b.csv": data, "a": b"1,1\n"}, split_type="Line",
        input_content_type=CSV, accept=CSV, assemble_with="Line", instance_count=4,
        max_batch_payload_bytes=50)
    assert summary.shards > 2
    assert outputs == {"a#b.csv.out": b"".join(f"{2 * i + 1}.0\n".encode() for i in range(100)),
                       "a.out": b"2.0\n"}


def test_one_object_input_is_keyed_by_its_decoded_name(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in/a#b.csv").write_bytes(b"1\n")
    s = _settings(tmp_path, input_uri=f"file://{tmp_path}/in/a%23b.csv")
    [obj] = make_plan(s, _store(s)).objects
    assert (obj.key, obj.size) == ("a#b.csv", 2)
    assert output_uri(output_folder(s), obj.key).endswith("/out/a%23b.csv.out")


def test_an_output_folder_whose_own_name_would_not_survive_decoding_is_refused(
        tmp_path: Path) -> None:
    for name in ["o%23x", "100%2541"]:
        with pytest.raises(BadInput, match="names a folder with '#', '\\?' or '%'"):
            output_folder(_settings(tmp_path, output_uri=f"file://{tmp_path}/{name}/"))
    spaced = _settings(tmp_path, output_uri=f"file://{tmp_path}/a%20b/")
    assert output_folder(spaced) == f"file://{tmp_path}/a b/"


# -- 1: no way out of the folders ---------------------------------------------------------


def test_encoded_parent_segments_are_names_not_a_way_out(tmp_path: Path) -> None:
    # The audit's manifest: it read data/x.csv through "%2e%2e/data/" and wrote over
    # "important.out" beside the output folder.
    (tmp_path / "data").mkdir()
    (tmp_path / "data/x.csv").write_bytes(b"1\n")
    (tmp_path / "important").write_text("keep")
    doc = [{"prefix": f"file://{tmp_path}/data/"}, "%2e%2e/data/x.csv", "%2e%2e/important"]
    (tmp_path / "m").mkdir()
    (tmp_path / "m/manifest.json").write_bytes(orjson.dumps(doc))
    s = _settings(tmp_path, input_uri=f"file://{tmp_path}/m/manifest.json",
                  data_type="ManifestFile")
    with pytest.raises(BadInput, match="entry 2 names no object"):
        make_plan(s, _store(s))
    assert (tmp_path / "important").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "important", "m"]
    # A folder really named "%2e%2e" is an ordinary folder below the prefix.
    (tmp_path / "data/%2e%2e/data").mkdir(parents=True)
    (tmp_path / "data/%2e%2e/data/x.csv").write_bytes(b"22\n")
    (tmp_path / "m/manifest.json").write_bytes(orjson.dumps(doc[:2]))
    [obj] = make_plan(s, _store(s)).objects
    assert (obj.key, obj.size) == ("%2e%2e/data/x.csv", 3)
    assert split_location(obj.uri) == ("file", "", f"{tmp_path}/data/%2e%2e/data/x.csv")


def test_within_compares_decoded_paths_normalised() -> None:
    assert not within("file:///d/in/%2e%2e/x", ["file:///d/in/"])
    assert not within("file:///d/in/%2E%2E/%2e%2e/etc/passwd", ["file:///d/in/"])
    assert not within("s3://b/in/%2e%2e/secrets/x", ["s3://b/in/"])
    assert not within("s3://b/in/x/%2e%2e", ["s3://b/in/"])  # the folder itself
    assert not within("s3://b/%2e%2e/other-bucket/x", ["s3://b/"])
    assert not within("file:///d/in/./", ["file:///d/in/"])
    assert not within("file://host/d/in/x", ["file:///d/in/"])
    assert within("file:///d/in/a/../b", ["file:///d/in/"])  # stays inside either way
    assert within("s3://b/in/a%20b.csv", ["s3://b/in/"])


# -- 3: keys our temporary files' names would be swept -----------------------------------


@pytest.mark.parametrize("key", [f"{TEMP_PREFIX}report.csv", f"sub/{TEMP_PREFIX}x/y.csv"])
def test_keys_named_like_temporary_files_are_refused(tmp_path: Path, key: str) -> None:
    (tmp_path / "in" / key).parent.mkdir(parents=True)
    (tmp_path / "in" / key).write_bytes(b"1\n")
    error = _refused(_settings(tmp_path), "temporary files")
    assert repr(key) in error.message


# -- 4, 5: listing a file:// folder ------------------------------------------------------


def test_a_broken_symbolic_link_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in/a.csv").write_bytes(b"1\n")
    os.symlink(tmp_path / "in/gone.csv", tmp_path / "in/link.csv")
    _refused(_settings(tmp_path), r"'link.csv' .* is a broken symbolic link: remove it")


def test_an_unreadable_subfolder_is_refused_not_skipped(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "in/locked").mkdir(parents=True)
    (tmp_path / "in/a.csv").write_bytes(b"1\n")
    (tmp_path / "in/locked/b.csv").write_bytes(b"secret\n")
    scandir = os.scandir

    def denied(path: str) -> object:  # chmod 000 does not stop root, which tests may be
        if str(path).endswith("/locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied)
    error = _refused(_settings(tmp_path), r"Input folder 'locked' in file://.* cannot be listed "
                     r"\(Permission denied\)")
    assert "b.csv" not in error.message and "secret" not in error.message


# -- 6: outputs the output folder cannot hold ---------------------------------------------


def test_a_segment_too_long_for_its_output_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / ("L" * 252)).write_bytes(b"1\n")
    _refused(_settings(tmp_path), "255 bytes")
    # 251 bytes is the longest that takes '.out'; bytes, not characters, count.
    os.unlink(tmp_path / "in" / ("L" * 252))
    for key in ["L" * 251, "é" * 125]:
        (tmp_path / "in" / key).write_bytes(b"1\n")
    s = _settings(tmp_path)
    store = _store(s)
    for obj in make_plan(s, store).objects:
        store.write_bytes(output_uri(output_folder(s), obj.key), b"r\n")
        assert (tmp_path / "out" / f"{obj.key}.out").read_bytes() == b"r\n"
    (tmp_path / "in" / ("é" * 126)).write_bytes(b"1\n")  # 252 bytes
    (tmp_path / "out/_kubeinfer/plan.json").unlink()
    _refused(s, "255 bytes")


def test_an_output_that_must_be_a_file_and_a_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "in/a.out").mkdir(parents=True)
    (tmp_path / "in/a").write_bytes(b"1\n")
    (tmp_path / "in/a.out/b").write_bytes(b"2\n")
    _refused(_settings(tmp_path), r"'a' and 'a.out/b' cannot both be answered.*rename one")


def test_output_limits_follow_the_output_store() -> None:
    objs = [ObjectRef(uri="s3://b/in/a", key="a", size=1),
            ObjectRef(uri="s3://b/in/a.out/b", key="a.out/b", size=1)]
    shards = plan_module.cut_shards(objs, instance_count=1, splittable=False)
    assert output_problem(objs, shards, "s3://b/out/") is None  # S3 keys may be both
    assert output_problem(objs, shards, "file:///d/out/") is not None
    deep = "/".join(["d" * 200] * 21)  # every name fits; the path does not
    big = [ObjectRef(uri="s3://b/in/x", key=deep, size=1)]
    one = plan_module.cut_shards(big, instance_count=1, splittable=False)
    assert "4095" in (output_problem(big, one, "file:///d/out/") or "")
    long_key = "k" * 1020
    assert "1024" in (output_problem([ObjectRef(uri="s3://b/x", key=long_key, size=1)],
                                     one, "s3://b/out/") or "")
    # A split object's parts take the longest path: counted when it is split.
    parts = [Shard(index=0, parts=[ShardPart(object=0, start=0, end=1)]),
             Shard(index=1, parts=[ShardPart(object=0, start=1, end=2)])]
    key = "k" * (1024 - len("out/") - len(".out"))
    whole = [ObjectRef(uri="s3://b/x", key=key, size=2)]
    assert output_problem(whole, plan_module.cut_shards(whole, instance_count=1,
                                                        splittable=False), "s3://b/out/") is None
    assert output_problem(whole, parts, "s3://b/out/") is not None


# -- 7: printable keys only ---------------------------------------------------------------


@pytest.mark.parametrize("key", ["a\tb.csv", "esc\x1b[31m.csv", "line\u2028sep", "del\x7f",
                                 "nul\x00", "cr\r", "zero\u200bwidth"])
def test_keys_with_non_printable_characters_are_refused(key: str) -> None:
    assert key_problem(key) == "holds a control or other non-printable character"


def test_a_listed_non_printable_name_is_refused_quoted(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in/a\tb\x1b.csv").write_bytes(b"1\n")
    error = _refused(_settings(tmp_path), "non-printable")
    assert "'a\\tb\\x1b.csv'" in error.message and "\x1b" not in error.message
