"""Local mode's reading of EdgeFleet manifests: what ``kubeinfer up -f`` hands the runner."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubeinfer_operator.api.edge_fleet import EdgeFleetSpec
from kubeinfer_operator.errors import SpecError
from kubeinfer_operator.local.edge_control import parse_fleets
from kubeinfer_operator.render.edge_plan import fleet_version

BASE = """\
apiVersion: kubeinfer.io/v1alpha1
kind: EdgeFleet
metadata:
  name: {name}
spec:
  model:
    uri: {uri}
  targets:
    - name: x86-64
    - name: arm64
      compile: {{target: aarch64}}
  rollout:
    waves:
      - {{percentage: 10, maxFailurePercent: 5}}
  dataCapture: {{samplingPercentage: {sampling}, destination: "{dest}"}}
  registration: {{bootstrapTokenSecret: {{name: boot, key: token}}}}
  signing: {{keySecret: {{name: sign, key: key}}}}
  packages: {{uri: s3://p/}}
  redis: {{url: redis://r:6379/0}}
"""


def text(name: str = "sensors", uri: str = "file://models/mlp.onnx", sampling: int = 0,
         dest: str = "") -> str:
    return BASE.format(name=name, uri=uri, sampling=sampling, dest=dest)


def test_a_fleet_becomes_a_local_fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                       ) -> None:
    monkeypatch.setenv("KUBEINFER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KUBEINFER_REDIS_URL", raising=False)
    monkeypatch.delenv("KUBEINFER_EDGE_HOST", raising=False)
    [loaded] = parse_fleets(text(sampling=5, dest="file://captures/"), source="f.yaml",
                            base_dir="/srv/m", port=9000)
    fleet = loaded.fleet
    assert fleet.name == "sensors" and fleet.port == 9000 and fleet.host == "127.0.0.1"
    # Relative file:// paths are the manifest's directory's, as for every local kind.
    assert fleet.model_uri == "file:///srv/m/models/mlp.onnx"
    assert fleet.capture.destination == "file:///srv/m/captures"
    assert [(t.name, t.compile_target) for t in fleet.targets] == [("x86-64", None),
                                                                   ("arm64", "aarch64")]
    # The same version the operator computes for the spec: a cluster and a laptop agree.
    import yaml

    spec = EdgeFleetSpec.model_validate(yaml.safe_load(text(sampling=5,
                                                            dest="file://captures/"))["spec"])
    assert fleet.version == fleet_version(spec)
    # The spec's Redis URL is the cluster's: locally a private one (None) unless the env says.
    assert fleet.redis_url is None
    # No local Secrets: the runner makes a key and a token.
    assert fleet.signing_key_file is None and fleet.bootstrap_token_file is None


def test_local_secrets_are_used_when_they_exist(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("KUBEINFER_HOME", str(home))
    (home / "secrets" / "boot").mkdir(parents=True)
    (home / "secrets" / "boot" / "token").write_text("t" * 32)
    [loaded] = parse_fleets(text(), source="f.yaml", base_dir="/srv")
    assert loaded.fleet.bootstrap_token_file == str(home / "secrets" / "boot" / "token")
    assert loaded.fleet.signing_key_file is None


def test_a_model_change_is_a_new_version_and_capture_settings_are_not() -> None:
    [a] = parse_fleets(text(), source="f.yaml", base_dir="/srv")
    [b] = parse_fleets(text(uri="file://models/other.onnx"), source="f.yaml", base_dir="/srv")
    [c] = parse_fleets(text(sampling=1, dest="file:///tmp/c/"), source="f.yaml",
                       base_dir="/srv")
    assert a.fleet.version != b.fleet.version
    assert a.fleet.version == c.fleet.version


@pytest.mark.parametrize(("manifest", "expected"), [
    (text(uri="http://example.com/m.onnx"), "spec.model.uri"),
    (text(sampling=5), "spec.dataCapture.destination"),
    (text(name="Bad_Name"), "metadata.name"),
    (text().replace("kind: EdgeFleet", "kind: Endpoint"), "cannot run beside an EdgeFleet"),
    (text().replace("v1alpha1", "v1"), "apiVersion"),
    (text().replace("    - name: x86-64\n", "    - name: x86-64\n      bogus: 1\n"),
     "spec.targets"),
    (text() + "---\n" + text(), "appears twice"),
    ("", "holds no EdgeFleet"),
    ("a: [", "not valid YAML"),
], ids=["scheme", "capture-dest", "name", "other-kind", "api-version", "unknown-field",
        "twice", "empty", "yaml"])
def test_bad_manifests_are_refused_naming_the_field(manifest: str, expected: str) -> None:
    with pytest.raises(SpecError, match=expected):
        parse_fleets(manifest, source="f.yaml", base_dir="/srv")


def test_one_port_for_two_fleets_is_refused() -> None:
    with pytest.raises(SpecError, match="--port"):
        parse_fleets(text("a") + "---\n" + text("b"), source="f.yaml", base_dir="/srv",
                     port=9000)
