"""The plan step: shards (pure), listing, confinement of keys, manifests and symlinks."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubeinfer_runtime.batch.errors import BadInput, InputRefused
from kubeinfer_runtime.batch.plan import (
    MIN_SHARD_BYTES,
    OBJECT_OVERHEAD_BYTES,
    cut_shards,
    input_root,
    make_plan,
    output_folder,
    read_plan,
)
from kubeinfer_runtime.batch.store import Store
from kubeinfer_runtime.contract.batch import BatchSettings, ObjectRef, select_shards

MB = 1 << 20


def objects(sizes: list[int]) -> list[ObjectRef]:
    return [ObjectRef(uri=f"s3://b/in/{i:05d}", key=f"{i:05d}", size=s)
            for i, s in enumerate(sizes)]


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 200 * MB), min_size=1, max_size=40),
       instances=st.integers(1, 16), splittable=st.booleans())
def test_every_byte_of_every_object_is_in_exactly_one_part(sizes: list[int], instances: int,
                                                           splittable: bool) -> None:
    shards = cut_shards(objects(sizes), instance_count=instances, splittable=splittable)
    assert [s.index for s in shards] == list(range(len(shards)))
    covered: dict[int, list[tuple[int, int]]] = {}
    for shard in shards:
        assert shard.parts
        for part in shard.parts:
            covered.setdefault(part.object, []).append((part.start, part.end))
    for i, size in enumerate(sizes):
        ranges = sorted(covered[i])
        assert ranges[0][0] == 0 and ranges[-1][1] == size
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
        if not splittable:
            assert ranges == [(0, size)]


def test_one_large_object_spreads_over_a_few_shards_per_worker() -> None:
    shards = cut_shards(objects([1000 * MB]), instance_count=2, splittable=True)
    assert len(shards) == 8
    assert cut_shards(objects([1000 * MB]), instance_count=2, splittable=False)[0].parts[0].end \
        == 1000 * MB


def test_many_small_objects_are_packed_into_few_shards() -> None:
    shards = cut_shards(objects([2000] * 10_000), instance_count=2, splittable=True)
    assert len(shards) <= 8
    assert sum(len(s.parts) for s in shards) == 10_000
    # Empty objects still weigh their requests: they do not all land in one shard.
    many = cut_shards(objects([0] * 1000), instance_count=1, splittable=True)
    assert 1000 * OBJECT_OVERHEAD_BYTES > 4 * MIN_SHARD_BYTES
    assert len(many) == 4


def test_shard_selectors(monkeypatch: pytest.MonkeyPatch) -> None:
    assert select_shards("all", 3) == [0, 1, 2]
    assert select_shards("4", 10) == [4] and select_shards("12", 10) == []
    assert select_shards("1/3", 8) == [1, 4, 7]
    with pytest.raises(ValueError, match="i/n"):
        select_shards("2/2", 8)
    monkeypatch.setenv("KUBEINFER_SHARDS", "first")
    with pytest.raises(ValueError, match="all, an index"):
        BatchSettings(model_url="http://x")


def test_job_completion_index_wins_over_a_rendered_selector(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    monkeypatch.setenv("KUBEINFER_SHARDS", "all")
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "3")
    assert BatchSettings(model_url="http://x").shards == "3"


def _settings(tmp: Path, **kw: object) -> BatchSettings:
    base: dict[str, object] = dict(model_url="http://127.0.0.1:1",
                                   input_uri=f"file://{tmp}/in/",
                                   output_uri=f"file://{tmp}/out/")
    base.update(kw)
    return BatchSettings(**base)  # type: ignore[arg-type]


def _store(s: BatchSettings) -> Store:
    return Store(s.s3(), file_roots=[input_root(s), output_folder(s)])


def test_plan_lists_keys_mirrors_them_and_is_kept(tmp_path: Path) -> None:
    (tmp_path / "in/sub").mkdir(parents=True)
    (tmp_path / "in/a.csv").write_bytes(b"1\n")
    (tmp_path / "in/sub/b.csv").write_bytes(b"22\n")
    s = _settings(tmp_path)
    plan = make_plan(s, _store(s))
    assert [(o.key, o.size) for o in plan.objects] == [("a.csv", 2), ("sub/b.csv", 3)]
    # A re-run keeps the plan, even when the input changed since.
    (tmp_path / "in/c.csv").write_bytes(b"3\n")
    assert make_plan(s, _store(s)) == plan
    # Another job's plan in the same output is refused, naming the fix.
    other = _settings(tmp_path, input_uri=f"file://{tmp_path}/in/sub/")
    with pytest.raises(BadInput, match=r"holds the plan of another job.*delete"):
        read_plan(other, _store(other))
    with pytest.raises(BadInput, match="splitType"):
        make_plan(_settings(tmp_path, split_type="Line"), _store(s))


def test_single_object_input_and_outputs_inside_the_input_folder(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in/a.csv").write_bytes(b"1\n")
    (tmp_path / "in/out/old.csv.out").parent.mkdir()
    (tmp_path / "in/out/old.csv.out").write_bytes(b"x")
    s = _settings(tmp_path, output_uri=f"file://{tmp_path}/in/out/")
    assert [o.key for o in make_plan(s, _store(s)).objects] == ["a.csv"]
    one = _settings(tmp_path, input_uri=f"file://{tmp_path}/in/a.csv",
                    output_uri=f"file://{tmp_path}/o2/")
    assert [(o.key, o.uri) for o in make_plan(one, _store(one)).objects] == [
        ("a.csv", f"file://{tmp_path}/in/a.csv")]


def test_empty_input_is_refused(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    s = _settings(tmp_path)
    with pytest.raises(BadInput, match="holds no objects"):
        make_plan(s, _store(s))


def test_symlinks_escaping_the_input_folder_are_refused(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "secret").write_text("password")
    os.symlink(tmp_path / "secret", tmp_path / "in/link.csv")
    s = _settings(tmp_path)
    with pytest.raises(InputRefused, match="outside the job's folders"):
        make_plan(s, _store(s))
    os.unlink(tmp_path / "in/link.csv")
    os.symlink(tmp_path, tmp_path / "in/up")  # a folder link out: refused too
    with pytest.raises(InputRefused, match="outside the job's folders"):
        make_plan(s, _store(s))


def test_a_fifo_in_the_input_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    os.mkfifo(tmp_path / "in/pipe")
    s = _settings(tmp_path)
    with pytest.raises(InputRefused, match="not a regular file"):
        make_plan(s, _store(s))


def _manifest(tmp: Path, doc: object) -> BatchSettings:
    (tmp / "m").mkdir(exist_ok=True)
    (tmp / "m/manifest.json").write_bytes(orjson.dumps(doc))
    return _settings(tmp, input_uri=f"file://{tmp}/m/manifest.json",
                     data_type="ManifestFile")


def test_manifest_lists_objects_below_its_prefix(tmp_path: Path) -> None:
    (tmp_path / "data/x").mkdir(parents=True)
    (tmp_path / "data/x/1.csv").write_bytes(b"1\n")
    (tmp_path / "data/2.csv").write_bytes(b"22\n")
    s = _manifest(tmp_path, [{"prefix": f"file://{tmp_path}/data/"}, "x/1.csv", "2.csv"])
    plan = make_plan(s, _store(s))
    assert [(o.key, o.uri) for o in plan.objects] == [
        ("2.csv", f"file://{tmp_path}/data/2.csv"), ("x/1.csv", f"file://{tmp_path}/data/x/1.csv")]


@pytest.mark.parametrize(("entry", "message"), [
    ("../secret", "'..'"), ("/etc/passwd", "absolute"), ("a/../../secret", "'..'"),
    ("a//b", "empty"), (7, "is not a key"), ("missing.csv", "names no object"),
])
def test_hostile_manifest_entries_are_refused(tmp_path: Path, entry: object,
                                              message: str) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "secret").write_text("password")
    s = _manifest(tmp_path, [{"prefix": f"file://{tmp_path}/data/"}, entry])
    with pytest.raises(BadInput, match=message) as e:
        make_plan(s, _store(s))
    assert "password" not in e.value.message


def test_manifest_prefix_must_be_a_folder_we_can_confine(tmp_path: Path) -> None:
    for prefix, message in [("file:///", "must be an absolute path"), ("http://x/", "scheme"),
                            (f"file://{tmp_path}/../etc/", "'..'")]:
        s = _manifest(tmp_path, [{"prefix": prefix}, "passwd"])
        with pytest.raises(BadInput, match=message):
            make_plan(s, _store(s))
    s = _manifest(tmp_path, ["no prefix"])
    with pytest.raises(BadInput, match="must start with"):
        make_plan(s, _store(s))


def test_manifest_symlink_out_of_its_prefix_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "secret").write_text("password")
    os.symlink(tmp_path / "secret", tmp_path / "data/s.csv")
    s = _manifest(tmp_path, [{"prefix": f"file://{tmp_path}/data/"}, "s.csv"])
    with pytest.raises(InputRefused, match="outside the job's folders"):
        make_plan(s, _store(s))


def test_output_uri_must_be_a_folder(tmp_path: Path) -> None:
    for uri in ["file:///", "ftp://x/y", "s3://", "file://rel/dir"]:
        with pytest.raises(BadInput):
            output_folder(_settings(tmp_path, output_uri=uri))
