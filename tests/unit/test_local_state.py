"""State files of local mode: atomic writes, events, the supervisor lock, pid identity."""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

from kubeinfer_operator.local.paths import EndpointPaths, known_endpoints
from kubeinfer_operator.local.state import (
    DesiredSpec,
    EndpointState,
    append_event,
    lock_is_held,
    process_alive,
    process_start_time,
    read_desired,
    read_events,
    read_state,
    write_desired,
    write_state,
)


def test_state_and_desired_round_trip_and_garbage_reads_as_none(tmp_path: Path) -> None:
    paths = EndpointPaths(tmp_path / "iris")
    assert read_state(paths) is None
    write_state(paths, EndpointState(endpoint="iris", supervisor_pid=5, url="http://x"))
    assert read_state(paths) == EndpointState(endpoint="iris", supervisor_pid=5, url="http://x")
    write_desired(paths, DesiredSpec(generation=2, manifest={"a": 1}, base_dir="/b"))
    desired = read_desired(paths)
    assert desired is not None and desired.generation == 2
    paths.state.write_text("{not json")
    assert read_state(paths) is None
    # No temp files are left behind by atomic writes.
    assert sorted(p.name for p in paths.root.iterdir()) == ["desired.json", "state.json"]


def test_known_endpoints_lists_dirs_with_state(tmp_path: Path) -> None:
    (tmp_path / "local" / "empty").mkdir(parents=True)
    write_state(EndpointPaths(tmp_path / "local" / "b"),
                EndpointState(endpoint="b", supervisor_pid=1))
    write_desired(EndpointPaths(tmp_path / "local" / "a"),
                  DesiredSpec(generation=1, manifest={}, base_dir="/"))
    assert [p.name for p in known_endpoints(tmp_path)] == ["a", "b"]


def test_events_are_read_incrementally_and_partial_lines_wait(tmp_path: Path) -> None:
    paths = EndpointPaths(tmp_path / "iris")
    append_event(paths, "one", now=1.0)
    events, offset = read_events(paths)
    assert [e["message"] for e in events] == ["one"]
    with open(paths.events, "a") as fh:
        fh.write('{"message": "half')
    append_event(paths, "ignored until the line is whole")
    events, offset2 = read_events(paths, offset)
    assert events == []  # the torn line ends with the next event's newline: skipped as garbage
    assert offset2 > offset
    append_event(paths, "two", level="error", process="a-0")
    events, _ = read_events(paths, offset2)
    assert [(e["message"], e["level"], e["process"]) for e in events] == [("two", "error", "a-0")]


def test_lock_is_held_only_while_someone_holds_it(tmp_path: Path) -> None:
    paths = EndpointPaths(tmp_path / "iris")
    assert not lock_is_held(paths)
    paths.root.mkdir()
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT)
    try:
        assert not lock_is_held(paths)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert lock_is_held(paths)
    finally:
        os.close(fd)
    assert not lock_is_held(paths)


def test_process_identity_uses_start_time() -> None:
    me = os.getpid()
    start = process_start_time(me)
    assert start is not None
    assert process_alive(me, start)
    assert process_alive(me, None)
    assert not process_alive(me, start + 1)  # same pid, different process: a reused pid
    assert not process_alive(None, None)
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert not process_alive(proc.pid, None)
