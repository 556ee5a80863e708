"""A batch job reads only its input, whatever its manifest or its stored plan says.

On Kubernetes the operator refuses a file:// input or output (a path inside the worker's
pod; in local mode, the user's own files). The manifest's prefix and the plan
(``_kubeinfer/plan.json`` in the output folder, which whoever may write the output
folder may rewrite) are read by the workers alone: a job whose folders are in S3 reads no
file, and a plan may list only what listing the input gives (no other bucket's object,
no key that would put an output outside the output folder).
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from kubeinfer_runtime.batch.errors import BadInput
from kubeinfer_runtime.batch.plan import (
    confine,
    input_root,
    list_input,
    make_plan,
    output_folder,
    read_plan,
    state_uri,
)
from kubeinfer_runtime.batch.store import Store
from kubeinfer_runtime.contract.batch import PLAN_NAME, BatchSettings, ObjectRef

MANIFEST = "s3://tenant/in/manifest.json"


def _settings(**kw: object) -> BatchSettings:
    base: dict[str, object] = dict(model_url="http://127.0.0.1:1", input_uri=MANIFEST,
                                   output_uri="s3://tenant/out/", data_type="ManifestFile")
    base.update(kw)
    return BatchSettings(**base)


class _ManifestInS3(Store):
    """The job's S3 manifest, served without an object store."""

    def __init__(self, settings: BatchSettings, doc: object) -> None:
        super().__init__(settings.s3(), file_roots=[input_root(settings),
                                                    output_folder(settings)])
        self.doc = orjson.dumps(doc)

    def read(self, uri: str, max_bytes: int) -> bytes | None:
        return self.doc if uri == MANIFEST else None


def test_an_s3_manifest_may_not_list_local_files(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("password")
    s = _settings()
    store = _ManifestInS3(s, [{"prefix": f"file://{tmp_path}/"}, "secret"])
    for step in (confine, list_input):
        with pytest.raises(BadInput, match="a manifest in S3 may not name") as e:
            step(s, store)
        assert "password" not in e.value.message
    assert store.file_roots == ()


def test_a_job_in_s3_reads_no_file_its_plan_names(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("password")
    s = _settings(input_uri="s3://tenant/in/", data_type="S3Prefix")
    store = Store(s.s3(), file_roots=[input_root(s), output_folder(s)])
    with pytest.raises(BadInput, match="all in S3") as e:
        b"".join(store.chunks(f"file://{tmp_path}/secret"))
    assert "password" not in e.value.message
    with pytest.raises(BadInput, match="all in S3"):
        store.size(f"file://{tmp_path}/secret")
    with pytest.raises(BadInput, match="all in S3"):
        store.write_bytes(f"file://{tmp_path}/out.txt", b"x")
    assert not (tmp_path / "out.txt").exists()


def test_a_local_manifest_still_lists_its_folder(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data/1.csv").write_bytes(b"1\n")
    (tmp_path / "m.json").write_bytes(orjson.dumps([{"prefix": f"file://{tmp_path}/data/"},
                                                    "1.csv"]))
    s = _settings(input_uri=f"file://{tmp_path}/m.json", output_uri=f"file://{tmp_path}/out/")
    store = Store(s.s3(), file_roots=[input_root(s), output_folder(s)])
    assert [o.key for o in list_input(s, store)] == ["1.csv"]


def _local(tmp: Path) -> tuple[BatchSettings, Store]:
    (tmp / "in").mkdir()
    (tmp / "in/a.csv").write_bytes(b"1\n")
    s = _settings(input_uri=f"file://{tmp}/in/", output_uri=f"file://{tmp}/out/",
                  data_type="S3Prefix")
    return s, Store(s.s3(), file_roots=[input_root(s), output_folder(s)])


@pytest.mark.parametrize(("uri", "key"), [
    ("s3://other-bucket/private.csv", "a.csv"),    # another bucket's object, read
    ("{in}a.csv", "../../../other-bucket/x"),      # an output written outside the folder
    ("{in}..%2Fsecret", "..%2Fsecret"),            # a key the planner never derives
])
def test_a_plan_rewritten_in_the_output_folder_is_refused(tmp_path: Path, uri: str,
                                                          key: str) -> None:
    s, store = _local(tmp_path)
    plan = make_plan(s, store)
    forged = plan.model_copy(update={"objects": [
        ObjectRef(uri=uri.format(**{"in": f"file://{tmp_path}/in/"}), key=key, size=2)]})
    store.write_bytes(state_uri(s, PLAN_NAME), forged.model_dump_json().encode())
    with pytest.raises(BadInput, match="plan the job again"):
        read_plan(s, store)


def test_the_plan_the_planner_wrote_is_read_back(tmp_path: Path) -> None:
    s, store = _local(tmp_path)
    assert read_plan(s, store) is None
    plan = make_plan(s, store)
    assert read_plan(s, store) == plan
