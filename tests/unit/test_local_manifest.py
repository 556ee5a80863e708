"""Reading Endpoint manifests for local mode: every problem named by document and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubeinfer_operator.errors import SpecError
from kubeinfer_operator.local.manifest import load_manifest_file, parse_manifests
from kubeinfer_operator.render.plan import plan_endpoint

REPO = Path(__file__).resolve().parents[2]

GOOD = """
apiVersion: kubeinfer.io/v1alpha1
kind: Endpoint
metadata: {name: %s}
spec:
  variants:
    - name: primary
      model: {uri: file://models/iris.onnx}
"""


def parse(text: str) -> list[str]:
    return [e.name for e in parse_manifests(text, source="x.yaml", base_dir="/base")]


def test_example_manifest_loads_and_resolves_relative_models() -> None:
    [item] = load_manifest_file(REPO / "examples" / "realtime-endpoint.yaml")
    assert item.name == "iris"
    plan = plan_endpoint(item.endpoint, base_dir=item.base_dir)
    assert plan.variants[0].model_uri == f"file://{REPO}/examples/models/iris.onnx"


def test_several_documents_and_empty_ones() -> None:
    text = GOOD % "one" + "---\n---\n" + GOOD % "two"
    assert parse(text) == ["one", "two"]


def test_invalid_weight_names_document_and_field() -> None:
    text = GOOD % "one" + "---\n" + (GOOD % "two").replace("- name: primary",
                                                          "- name: primary\n      weight: -1")
    with pytest.raises(SpecError) as exc:
        parse(text)
    msg = str(exc.value)
    assert "x.yaml document 2 (Endpoint 'two'): spec.variants[0].weight:" in msg
    assert "greater than or equal to 0" in msg


def test_every_problem_reported_at_once() -> None:
    text = (GOOD % "one").replace("uri: file://models/iris.onnx", "uri: ftp://x/y") + \
        "---\n" + (GOOD % "two").replace("name: primary", "name: Primary_1")
    with pytest.raises(SpecError) as exc:
        parse(text)
    lines = str(exc.value).splitlines()
    assert any("document 1" in x and "spec.variants[0].model.uri" in x and "ftp" in x
               for x in lines)
    assert any("document 2" in x and "spec.variants[0].name" in x for x in lines)


def test_unknown_field_says_check_spelling() -> None:
    with pytest.raises(SpecError, match=r"spec.variants\[0\].replica: unknown field"):
        parse((GOOD % "one").replace("- name: primary", "- name: primary\n      replica: 2"))


def test_wrong_kind_yaml_errors_empty_and_duplicates() -> None:
    with pytest.raises(SpecError, match="kind: 'Deployment' is not supported in local mode"):
        parse((GOOD % "one").replace("kind: Endpoint", "kind: Deployment"))
    with pytest.raises(SpecError, match="is not valid YAML"):
        parse("a: [1, 2")
    with pytest.raises(SpecError, match="holds no document"):
        parse("# nothing\n")
    with pytest.raises(SpecError, match="expected a mapping"):
        parse("- 1\n- 2\n")
    with pytest.raises(SpecError, match="Endpoint 'one' appears twice"):
        parse(GOOD % "one" + "---\n" + GOOD % "one")


def test_missing_file_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"Cannot read .*nope\.yaml"):
        load_manifest_file(tmp_path / "nope.yaml")


PROMETHEUS = GOOD.replace("model: {uri: file://models/iris.onnx}",
                          "model: {uri: file://models/iris.onnx}\n"
                          "      autoscaling: {maxReplicas: 2, prometheusUrl: '%s'}")


def test_outbound_urls_are_held_to_the_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """``kubeinfer up`` refuses what the operator refuses, with the same message."""
    monkeypatch.delenv("KUBEINFER_OUTBOUND_ALLOW", raising=False)
    text = PROMETHEUS % ("one", "http://169.254.169.254/")
    with pytest.raises(SpecError) as exc:
        parse(text)
    assert str(exc.value) == (
        "x.yaml document 1 (Endpoint 'one'): spec.variants[0].autoscaling.prometheusUrl: "
        "'http://169.254.169.254/' points at the cloud metadata service (169.254.169.254); "
        "outbound calls may not reach link-local or API-server addresses: use another URL, or "
        "allow it with the chart's security.outboundAllowList (KUBEINFER_OUTBOUND_ALLOW)")
    assert parse(PROMETHEUS % ("two", "http://127.0.0.1:9090")) == ["two"]
    monkeypatch.setenv("KUBEINFER_OUTBOUND_ALLOW", "169.254.169.254/32")
    assert parse(text) == ["one"]
    monkeypatch.setenv("KUBEINFER_OUTBOUND_ALLOW", "169.254.169.254/32,http://x")
    with pytest.raises(SpecError, match="KUBEINFER_OUTBOUND_ALLOW: Outbound allow-list entry "
                                        "'http://x' is neither"):
        parse(text)
