"""The Dockerfile gives the operator and the runtime separate virtualenvs.

There is no Docker here: the Dockerfile is parsed, its dependency selector
(scripts/select-deps.py, which the Dockerfile copies in) is run against
pyproject.toml, and the imports of each side are checked in a fresh
interpreter, so the operator image carries no onnxruntime or numpy and the
runtime image no kopf.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "Dockerfile").read_text()
#: Serving libraries the operator image must not carry, and the reverse.
NOT_IN_OPERATOR = {"onnxruntime", "numpy"}
NOT_IN_RUNTIME = {"kopf", "kubernetes"}


def arg_default(name: str) -> list[str]:
    (value,) = re.findall(rf'^ARG {name}="([^"]*)"$', DOCKERFILE, re.M)
    return value.split()


def stage(name: str) -> str:
    """The text of one build stage, from its FROM line to the next."""
    parts = re.split(r"^(?=FROM )", DOCKERFILE, flags=re.M)
    (found,) = [p for p in parts if re.match(rf"FROM \S+ AS {re.escape(name)}\s*$", p, re.M)]
    return found


SELECT_DEPS = REPO / "scripts" / "select-deps.py"


def select_deps(*args: str) -> list[str]:
    """Run the Dockerfile's own `select-deps` script in the repository root."""
    assert "COPY scripts/select-deps.py /usr/local/bin/select-deps" in DOCKERFILE
    done = subprocess.run([sys.executable, str(SELECT_DEPS), *args], cwd=REPO,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def dist_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_each_venv_installs_only_its_share() -> None:
    operator, runtime = arg_default("OPERATOR_DEPS"), arg_default("RUNTIME_DEPS")
    assert not NOT_IN_OPERATOR & set(operator)
    assert not NOT_IN_RUNTIME & set(runtime)
    # Every name is a pyproject dependency (select-deps fails otherwise), and every
    # dependency lands in at least one image.
    assert {dist_name(r) for r in select_deps(*operator)} == set(operator)
    assert {dist_name(r) for r in select_deps(*runtime)} == set(runtime)
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert {dist_name(r) for r in declared} == set(operator) | set(runtime)
    # The compile extra goes to the runtime only, and pulls in no kopf either.
    assert not NOT_IN_RUNTIME & {dist_name(r) for r in select_deps("--extra", "compile")}


def test_select_deps_refuses_a_name_pyproject_does_not_list() -> None:
    done = subprocess.run([sys.executable, str(SELECT_DEPS), "kopf", "onnxruntimes"], cwd=REPO,
                          capture_output=True, text=True, check=False)
    assert done.returncode != 0 and "onnxruntimes" in done.stderr


@pytest.mark.parametrize(("builder", "share", "extra", "absent"), [
    ("operator-builder", "OPERATOR_DEPS", None, NOT_IN_OPERATOR),
    ("runtime-builder", "RUNTIME_DEPS", "compile", NOT_IN_RUNTIME),
])
def test_builder_stage_installs_its_share_pinned(
        builder: str, share: str, extra: str | None, absent: set[str]) -> None:
    text = stage(builder)
    assert re.search(rf"^ARG {share}$", text, re.M)
    assert f"select-deps ${{{share}}}" in text
    if extra:
        assert f"select-deps --extra {extra}" in text
    installs = re.findall(r"/opt/kubeinfer/bin/pip install ([^\\\n]*)", text)
    assert installs, builder
    for line in installs:
        words = shlex.split(line)
        if words[:2] == ["--upgrade", "pip"]:
            continue
        # Pinned by constraints.txt; kubeinfer itself without dependencies of its own.
        assert words[:2] == ["-c", "requirements/constraints.txt"] or (
            words[:3] == ["--no-deps", "-c", "requirements/constraints.txt"]), line
        assert not absent & {dist_name(w) for w in words}, line
    # The build proves the absence too.
    for name in absent:
        assert f'! /opt/kubeinfer/bin/python -c "import {name}"' in text


def test_final_images_copy_their_own_venv() -> None:
    assert "COPY --from=operator-builder /opt/kubeinfer /opt/kubeinfer" in stage("operator")
    assert "COPY --from=runtime-builder /opt/kubeinfer /opt/kubeinfer" in stage("runtime")
    assert re.search(r"^FROM runtime AS compiler", DOCKERFILE, re.M)


IMPORTED_DISTRIBUTIONS = """
import importlib, importlib.metadata, json, pkgutil, sys
for name in sys.argv[1:]:
    if name.endswith(".*"):
        package = importlib.import_module(name[:-2])
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if not info.name.startswith("kubeinfer_runtime.compile"):
                importlib.import_module(info.name)
    else:
        importlib.import_module(name)
owners = importlib.metadata.packages_distributions()
tops = {m.split(".")[0] for m in sys.modules}
print(json.dumps(sorted({d.lower().replace("_", "-") for t in tops for d in owners.get(t, [])})))
"""


def imported_distributions(*modules: str) -> set[str]:
    done = subprocess.run([sys.executable, "-c", IMPORTED_DISTRIBUTIONS, *modules], cwd=REPO,
                          capture_output=True, text=True, check=True, timeout=120)
    return set(json.loads(done.stdout))


def test_the_operator_imports_no_serving_library() -> None:
    """`kubeinfer operator` (cli → main) imports nothing only the runtime image has."""
    runtime_only = set(arg_default("RUNTIME_DEPS")) - set(arg_default("OPERATOR_DEPS"))
    assert runtime_only >= NOT_IN_OPERATOR
    # The kinds' CLI modules too: the CLI imports each only when its command runs.
    from kubeinfer_operator.cli import LAZY_MODULES

    imported = imported_distributions("kubeinfer_operator.cli", "kubeinfer_operator.main",
                                      *sorted(LAZY_MODULES))
    assert "kopf" in imported  # the check does see third-party imports
    assert imported & runtime_only == set()


def test_the_runtime_imports_no_kubernetes_library() -> None:
    """Every runtime module (the compile step aside: TVM) imports nothing only the operator has."""
    operator_only = set(arg_default("OPERATOR_DEPS")) - set(arg_default("RUNTIME_DEPS"))
    assert operator_only >= NOT_IN_RUNTIME
    imported = imported_distributions("kubeinfer_runtime.*")
    assert "onnxruntime" in imported
    assert imported & operator_only == set()


def test_e2e_third_party_images_are_pinned_by_digest() -> None:
    """A tag can be moved to another image; the e2e run must get what it was written
    against (the kind node image in e2e/run.sh included)."""
    images = []
    for manifest in sorted((REPO / "e2e" / "manifests").glob("*.yaml")):
        images += re.findall(r"^\s*image:\s*(\S+)", manifest.read_text(), re.M)
    images += re.findall(r"kindest/node:[^\s\"}]+", (REPO / "e2e" / "run.sh").read_text())
    assert images
    for image in images:
        assert re.search(r"@sha256:[0-9a-f]{64}$", image.strip("\"'")), image
