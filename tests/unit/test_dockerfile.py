"""The Dockerfile's structure: pinned base, two final targets, non-root, no build tools.

No Docker engine runs here, so the file is parsed (instructions, stages, the
chain of stages each target is built FROM) and checked for what matters at
run time and for what the Helm chart and the operator assume about the images.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kubeinfer_operator.settings import OperatorSettings
from kubeinfer_runtime.contract import ModelServerSettings

REPO = Path(__file__).resolve().parents[2]
NONROOT_UID = 65532
BUILD_TOOLS = re.compile(r"\b(apt-get|apt|pip|uv|gcc|g\+\+|make|build-essential)\b")


@dataclass
class Stage:
    name: str
    parent: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, instruction: str) -> list[str]:
        return [a for i, a in self.instructions if i == instruction]


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuations joined, comment lines dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a line continuation"
    return out


#: Global ARGs (before the first FROM) and stages by name.
Parsed = tuple[dict[str, str], dict[str, Stage]]


def parse(text: str) -> Parsed:
    """Global ARGs (before the first FROM) and stages by name."""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for keyword, rest in instructions(text):
        if keyword == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest, flags=re.IGNORECASE)
            assert m, f"every stage is named: FROM {rest}"
            current = Stage(name=m.group(2), parent=m.group(1))
            stages[current.name] = current
        elif current is None:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            name, _, default = rest.partition("=")
            global_args[name] = default
        else:
            current.instructions.append((keyword, rest))
    return global_args, stages


@pytest.fixture(scope="module")
def dockerfile() -> Parsed:
    return parse((REPO / "Dockerfile").read_text())


def chain(stages: dict[str, Stage], target: str) -> list[Stage]:
    """``target`` and every stage it is built FROM, down to the base image."""
    out = []
    name: str | None = target
    while name in stages:
        out.append(stages[name])
        name = stages[name].parent
    return out


def exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list), f"exec form (JSON array) expected: {value}"
    return [str(x) for x in parsed]


def test_parser_sees_continuations_and_skips_comments() -> None:
    got = instructions("FROM a AS b\n# note\nRUN one \\\n  # inside\n  && two\nUSER 1\n")
    assert got == [("FROM", "a AS b"), ("RUN", "one  && two"), ("USER", "1")]


def test_base_image_is_pinned_by_tag_and_digest(dockerfile: Parsed) -> None:
    global_args, stages = dockerfile
    base = global_args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", base), base
    for stage in stages.values():
        assert stage.parent == "${PYTHON_IMAGE}" or stage.parent in stages, (
            f"stage {stage.name} is FROM {stage.parent}: use the pinned ${{PYTHON_IMAGE}}"
        )


def test_targets_and_stages(dockerfile: Parsed) -> None:
    _, stages = dockerfile
    assert {"builder", "models", "operator", "runtime"} <= set(stages)
    # The final targets start again from the bare base, not from the builder.
    for target in ("operator", "runtime"):
        names = [s.name for s in chain(stages, target)]
        assert "builder" not in names and "models" not in names, names
        assert chain(stages, target)[-1].parent == "${PYTHON_IMAGE}"


@pytest.mark.parametrize("target", ["operator", "runtime"])
def test_final_stages_have_no_build_tools_and_no_source_tree(
        dockerfile: Parsed, target: str) -> None:
    _, stages = dockerfile
    for stage in chain(stages, target):
        for run in stage.args("RUN"):
            assert not BUILD_TOOLS.search(run), f"{stage.name}: RUN {run}"
        for copy in stage.args("COPY"):
            assert copy.startswith("--from="), f"{stage.name}: COPY {copy} copies the build context"
            assert copy.split()[0].removeprefix("--from=") in {
                "operator-builder", "runtime-builder", "models"}


@pytest.mark.parametrize("target", ["operator", "runtime"])
def test_final_stages_run_as_the_nonroot_uid(
        dockerfile: Parsed, target: str) -> None:
    _, stages = dockerfile
    users = [u for s in reversed(chain(stages, target)) for u in s.args("USER")]
    assert users, f"{target}: no USER"
    # Numeric, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
    assert users[-1] == f"{NONROOT_UID}:{NONROOT_UID}"
    assert OperatorSettings().runtime_uid == NONROOT_UID
    deployment = (REPO / "charts/kubeinfer/templates/deployment.yaml").read_text()
    assert f"runAsUser: {NONROOT_UID}" in deployment


def test_entrypoints_are_the_package_console_scripts(
        dockerfile: Parsed) -> None:
    _, stages = dockerfile
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    operator, runtime = stages["operator"], stages["runtime"]
    assert exec_form(operator.args("ENTRYPOINT")[-1]) == ["kubeinfer"]
    assert exec_form(operator.args("CMD")[-1]) == ["operator"]
    assert exec_form(runtime.args("ENTRYPOINT")[-1]) == ["kubeinfer-runtime"]
    assert exec_form(runtime.args("CMD")[-1])[:2] == ["serve", "--role"]
    assert {"kubeinfer", "kubeinfer-runtime"} <= set(scripts)


def test_runtime_image_bakes_the_example_models(
        dockerfile: Parsed) -> None:
    _, stages = dockerfile
    assert any("examples/build_models.py" in run for run in stages["models"].args("RUN"))
    # The multi-model example's nested TargetModel names (e2e/test_multimodel.py).
    assert any("examples/build_multimodel_models.py /out/models" in run
               for run in stages["models"].args("RUN"))
    base_dir = ModelServerSettings.model_fields["model_base_dir"].default
    # file://models/iris.onnx resolves to <base>/models/iris.onnx: the models live there.
    assert f"--from=models /out/models {base_dir}/models" in stages["runtime"].args("COPY")
    # codeUri: file://handlers of the pipeline examples.
    assert f"--from=models /out/handlers {base_dir}/handlers" in stages["runtime"].args("COPY")
    env = " ".join(stages["runtime"].args("ENV"))
    assert f"KUBEINFER_MODEL_BASE_DIR={base_dir}" in env


def test_dockerignore_lets_every_copied_path_through(
        dockerfile: Parsed) -> None:
    _, stages = dockerfile
    allowed = [line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    assert "*" in (REPO / ".dockerignore").read_text().splitlines(), "whitelist expected"
    for stage in stages.values():
        for copy in stage.args("COPY"):
            if copy.startswith("--from="):
                continue
            *sources, _dest = copy.split()
            for src in sources:
                src = src.rstrip("/")
                assert any(src == a or src.startswith(a + "/") for a in allowed), (
                    f"COPY {src} is excluded by .dockerignore: add !{src}"
                )
                assert (REPO / src).exists(), f"COPY {src}: no such path in the repository"


def test_only_the_runtime_carries_tvm(dockerfile: Parsed) -> None:
    """The runtime's venv adds the compile extra (TVM serves compiled artifacts); the
    operator's venv is its own, without it."""
    _, stages = dockerfile
    froms = {name: {c.split()[0].removeprefix("--from=") for c in stages[name].args("COPY")}
             for name in ("operator", "runtime")}
    assert "operator-builder" in froms["operator"] and "runtime-builder" not in froms["operator"]
    assert "runtime-builder" in froms["runtime"] and "operator-builder" not in froms["runtime"]
    assert any("select-deps --extra compile" in run
               for run in stages["runtime-builder"].args("RUN"))
    assert not any("compile" in run for run in stages["operator-builder"].args("RUN"))


def test_the_compiler_is_the_runtime_plus_gxx_only(dockerfile: Parsed) -> None:
    """TVM links compiled models with g++: the compile step's image has it, as a
    non-root image on top of the runtime, and nothing else is installed."""
    _, stages = dockerfile
    compiler = stages["compiler"]
    assert compiler.parent == "runtime"
    runs = compiler.args("RUN")
    assert len(runs) == 1 and "install -y --no-install-recommends g++ " in runs[0] + " "
    assert not compiler.args("COPY")
    assert compiler.args("USER")[-1] == "65532:65532"
