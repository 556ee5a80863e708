"""Where local mode keeps an endpoint's state: ``$KUBEINFER_HOME/local/<endpoint>/``.

One directory per endpoint so endpoints never share files: the supervisor's
lock, its state.json, the desired spec handed over by ``kubeinfer up``, the
gateway's route table and one log file per process.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from kubeinfer_runtime.wire import ROUTE_TABLE_FILENAME

HOME_ENV = "KUBEINFER_HOME"


def kubeinfer_home() -> Path:
    """``$KUBEINFER_HOME``, default ``~/.kubeinfer``."""
    value = os.environ.get(HOME_ENV)
    return Path(value).expanduser() if value else Path.home() / ".kubeinfer"


def private_home() -> Path:
    """``kubeinfer_home()``, made for this user alone before local mode writes under it.

    Endpoint and job logs (what a handler prints, the caller data it logs) and events
    are written with the default umask below it; a home readable by others would show
    them to every user of a shared machine. A new home is created 0700; the default one
    (``~/.kubeinfer``, ours) is tightened if an older version left it open. A home the
    user named is theirs: left as it is when it exists.
    """
    home = kubeinfer_home()
    if not home.exists():
        home.mkdir(parents=True, mode=0o700)
        home.chmod(0o700)  # mkdir's mode is masked by the umask
    elif not os.environ.get(HOME_ENV) and home.is_dir() and home.stat().st_mode & 0o077:
        home.chmod(0o700)
    return home


#: The folders under ``$KUBEINFER_HOME`` holding each job-like kind's local state.
TRANSFORM_JOBS_DIR = "jobs"
COMPILE_JOBS_DIR = "compile-jobs"
FLEETS_DIR = "fleets"


def has_kind_state(folder: str, home: Path | None = None) -> bool:
    """Whether ``$KUBEINFER_HOME/<folder>`` holds anything: the CLI imports a kind's
    modules (its API models and validators) only when it does."""
    try:
        return any((home or kubeinfer_home()).joinpath(folder).iterdir())
    except OSError:
        return False


def local_root(home: Path | None = None) -> Path:
    return (home or kubeinfer_home()) / "local"


#: A Secret's name as Kubernetes allows it (DNS-1123 subdomain).
_SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def secret_dir(name: str, home: Path | None = None) -> Path:
    """``$KUBEINFER_HOME/secrets/<name>/``: local mode's Secret ``name``, one file per key
    (the layout of a Secret mounted in a pod)."""
    if not _SECRET_NAME.fullmatch(name) or len(name) > 253 or ".." in name:
        raise ValueError(f"Secret name {name!r} is not valid: use lower-case letters, digits, "
                         "'-' and '.', as Kubernetes does")
    return (home or kubeinfer_home()) / "secrets" / name


@dataclass(frozen=True)
class EndpointPaths:
    """The files of one endpoint's state directory."""

    root: Path

    @classmethod
    def for_endpoint(cls, name: str, home: Path | None = None) -> EndpointPaths:
        return cls(local_root(home) / name)

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def state(self) -> Path:
        """Written by the supervisor: processes, ports, readiness (``kubeinfer status``)."""
        return self.root / "state.json"

    @property
    def desired(self) -> Path:
        """Written by ``kubeinfer up``: the spec the supervisor must run."""
        return self.root / "desired.json"

    @property
    def routes(self) -> Path:
        """The gateway's route table (contract.RouteTable), polled by the gateway."""
        return self.root / ROUTE_TABLE_FILENAME

    @property
    def lock(self) -> Path:
        """flock'ed by the live supervisor: a held lock means "running"."""
        return self.root / "supervisor.lock"

    @property
    def events(self) -> Path:
        """One JSON object per line: crashes, restarts, rollouts (followed by ``up``)."""
        return self.root / "events.jsonl"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def log_file(self, process_name: str) -> Path:
        return self.logs / f"{process_name}.log"

    @property
    def supervisor_log(self) -> Path:
        return self.logs / "supervisor.log"


def known_endpoints(home: Path | None = None) -> list[EndpointPaths]:
    """Every endpoint directory that has a state or desired file, sorted by name."""
    root = local_root(home)
    if not root.is_dir():
        return []
    found = []
    for child in sorted(root.iterdir()):
        paths = EndpointPaths(child)
        if child.is_dir() and (paths.state.exists() or paths.desired.exists()):
            found.append(paths)
    return found
