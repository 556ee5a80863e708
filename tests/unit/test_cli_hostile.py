"""Hostile or clumsy input to the `kubeinfer` CLI: a clear message and exit 2, never a
traceback or a hang."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kubeinfer_operator.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBEINFER_HOME", str(tmp_path / "home"))


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    nonutf = tmp_path / "nonutf.yaml"
    nonutf.write_bytes(b"\xff\xfe\x00bad")
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.yaml"
    with huge.open("wb") as fh:  # sparse: no 50 MB written
        fh.truncate(50 * 1024 * 1024)
    folder = tmp_path / "dir.yaml"
    folder.mkdir()
    return {"nonutf": (nonutf, "not UTF-8"), "deep": (deep, "nests too deeply"),
            "fifo": (fifo, "not a regular file"), "huge": (huge, "MiB a manifest may be"),
            "dir": (folder, "is a directory")}


@pytest.mark.parametrize("case", ["nonutf", "deep", "fifo", "huge", "dir"])
@pytest.mark.parametrize("argv", [["up", "-f"], ["promote", "iris", "shadow", "-f"],
                                  ["recommend", "-f"]])
def test_unreadable_manifest_exits_2_with_the_reason(tmp_path: Path, case: str,
                                                     argv: list[str]) -> None:
    path, said = _bad_files(tmp_path)[case]
    result = runner.invoke(app, [*argv, str(path)])
    assert result.exit_code == 2, (result.output, result.exception)
    assert said in " ".join(result.output.split())
    assert not isinstance(result.exception, (RecursionError, UnicodeDecodeError, OSError))


@pytest.mark.parametrize("case", ["nonutf", "deep", "fifo", "dir"])
def test_unreadable_candidates_file_exits_2(tmp_path: Path, case: str) -> None:
    path, said = _bad_files(tmp_path)[case]
    endpoint = Path(__file__).parents[2] / "examples" / "recommend-endpoint.yaml"
    result = runner.invoke(app, ["recommend", "-f", str(endpoint), "--candidates", str(path)])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Candidates file" in result.output and said in " ".join(result.output.split())


def test_promote_names_a_missing_endpoint_with_exit_2(tmp_path: Path) -> None:
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n")
    result = runner.invoke(app, ["promote", "iris", "shadow", "-f", str(listing)])
    assert result.exit_code == 2
    assert "no Endpoint named iris" in " ".join(result.output.split())


@pytest.mark.parametrize("name", ["a/b", "..", "", "../local/x"])
@pytest.mark.parametrize("argv", [["status"], ["down"], ["invoke", "--body", "{}"]])
def test_a_name_that_is_a_path_exits_2(name: str, argv: list[str]) -> None:
    result = runner.invoke(app, [*argv, "--", name])
    assert result.exit_code == 2, result.output
    assert "is not a valid name" in result.output


@pytest.mark.parametrize("argv", [["down", "iris", "--timeout", "-1"],
                                  ["invoke", "iris", "--body", "{}", "--timeout", "-1"]])
def test_a_negative_timeout_exits_2(argv: list[str]) -> None:
    result = runner.invoke(app, argv)
    assert result.exit_code == 2
    assert "--timeout" in result.output


@pytest.mark.parametrize("below", ["", "sub"])
@pytest.mark.parametrize("argv", [["status"], ["down"], ["invoke", "iris", "--body", "{}"],
                                  ["secret", "create", "s", "--from-literal", "a=b"]])
def test_a_kubeinfer_home_that_is_a_file_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 below: str, argv: list[str]) -> None:
    home = tmp_path / "file"
    home.write_text("not a folder")
    monkeypatch.setenv("KUBEINFER_HOME", str(home / below) if below else str(home))
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, (result.output, result.exception)
    assert "is not a folder; point KUBEINFER_HOME at a folder" in " ".join(result.output.split())


def test_a_running_endpoint_with_an_unreadable_state_file_is_not_called_stopped() -> None:
    from kubeinfer_operator.local.paths import EndpointPaths
    from kubeinfer_operator.local.state import take_lock_file

    paths = EndpointPaths.for_endpoint("iris")
    paths.root.mkdir(parents=True)
    paths.state.write_text('{"endpoint": "iris", "supervisor_p')  # truncated
    fd = take_lock_file(paths.lock)  # the supervisor's lock, held
    assert fd is not None
    try:
        for argv in (["status", "iris"], ["invoke", "iris", "--body", "{}"]):
            result = runner.invoke(app, argv)
            said = " ".join(result.output.split())
            assert result.exit_code == 1, result.output
            assert "is unreadable" in said and "not running" not in said
    finally:
        os.close(fd)


@pytest.mark.parametrize("flag", ["--content-type", "--accept", "--variant",
                                  "--custom-attributes", "--target-model"])
@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "é"])
def test_an_invoke_header_with_control_or_non_ascii_text_exits_2(flag: str, value: str) -> None:
    result = runner.invoke(app, ["invoke", "iris", "--body", "{}", flag, value])
    assert result.exit_code == 2, (result.output, result.exception)
    assert f"{flag} holds a control character or non-ASCII text" in result.output


def test_an_invoke_body_of_non_utf8_bytes_is_no_traceback() -> None:
    # What argv turns the bytes b"\xff" into: a lone surrogate.
    result = runner.invoke(app, ["invoke", "iris", "--body", "\udcff"])
    assert result.exit_code == 1, (result.output, result.exception)
    assert "Endpoint iris is not running" in result.output


def test_crds_out_that_is_a_file_or_unwritable_exits_2(tmp_path: Path) -> None:
    taken = tmp_path / "file"
    taken.write_text("x")
    result = runner.invoke(app, ["crds", "--out", str(taken)])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "is not a folder" in result.output
    result = runner.invoke(app, ["crds", "--out", str(taken / "sub")])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Cannot write the CRDs" in result.output


def test_a_key_given_twice_is_refused_not_silently_overwritten(tmp_path: Path) -> None:
    manifest = tmp_path / "dup.yaml"
    manifest.write_text("apiVersion: kubeinfer.io/v1alpha1\nkind: Endpoint\n"
                        "metadata: {name: x}\nspec: {variants: []}\nmetadata: {name: y}\n")
    result = runner.invoke(app, ["up", "-f", str(manifest)])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "key 'metadata' appears twice in one mapping" in result.output


def test_yaml_merge_keys_and_aliases_still_load() -> None:
    from kubeinfer_operator.local.manifest_io import yaml_documents

    docs = yaml_documents("a: &x {b: 1}\nc:\n  <<: *x\n  d: 2\n", "m.yaml")
    assert docs == [{"a": {"b": 1}, "c": {"b": 1, "d": 2}}]


def test_secret_from_a_pipe_with_no_writer_fails_instead_of_hanging(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubeinfer_operator import cli

    monkeypatch.setattr(cli, "_PIPE_WAIT_S", 0.2)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result = runner.invoke(app, ["secret", "create", "s", "--from-file", f"k={fifo}"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "nothing wrote to" in " ".join(result.output.split())


def test_secret_from_a_pipe_with_a_writer_is_read(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, b"token")
    os.close(write_end)
    try:
        result = runner.invoke(app, ["secret", "create", "s", "--from-file",
                                     f"k=/dev/fd/{read_end}"])
    finally:
        os.close(read_end)
    assert result.exit_code == 0, (result.output, result.exception)
    assert (tmp_path / "home" / "secrets" / "s" / "k").read_bytes() == b"token"


def test_secret_over_1_mib_or_of_non_utf8_argv_is_handled(tmp_path: Path) -> None:
    big = tmp_path / "big"
    with big.open("wb") as fh:
        fh.truncate(2 * 1024 * 1024)
    result = runner.invoke(app, ["secret", "create", "s", "--from-file", f"k={big}"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "over the 1 MiB a Secret may hold" in " ".join(result.output.split())
    result = runner.invoke(app, ["secret", "create", "s", "--from-literal", "k=\udcff"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert (tmp_path / "home" / "secrets" / "s" / "k").read_bytes() == b"\xff"


def test_promote_of_a_shadow_that_is_not_there_exits_2(tmp_path: Path) -> None:
    manifest = tmp_path / "shadow.yaml"
    manifest.write_text((Path(__file__).parents[2] / "examples" / "shadow-endpoint.yaml")
                        .read_text())
    before = manifest.read_text()
    result = runner.invoke(app, ["promote", "iris-shadow", "nope", "-f", str(manifest)])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "has no shadow 'nope'" in " ".join(result.output.split())
    assert manifest.read_text() == before
    result = runner.invoke(app, ["promote", "iris-shadow", "candidate"])
    assert result.exit_code == 2
