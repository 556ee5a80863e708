"""An EdgeFleet's plan and objects: strict-valid, locked down, secrets only by reference."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubeinfer_operator.api.edge_fleet import EdgeFleet, PackageStatus, VersionStatus
from kubeinfer_operator.reconcile.edge_validate import InvalidEdgeFleet, validate_edge_fleet
from kubeinfer_operator.render import edge_fleet as rf
from kubeinfer_operator.render import k8s_secrets as secrets
from kubeinfer_operator.render.edge_plan import FleetPlan, fleet_config, plan_fleet
from kubeinfer_operator.render.k8s_workloads import ANNOTATION_SECRET_HASH
from kubeinfer_operator.render.transform_names import ANNOTATION_RUN_HASH
from kubeinfer_operator.settings import OperatorSettings
from kubeinfer_runtime.contract.edge import FleetConfig, FleetServerSettings
from tests.support.kube_schema import schema_errors

REPO = Path(__file__).resolve().parents[2]
UID = "0b6c2a3e-1111-4222-8333-944455556666"
SETTINGS = OperatorSettings(s3_secret_name="s3-creds", runtime_image="example.test/rt:1",
                            compiler_image="example.test/compiler:1")
KEY = "A" * 43 + "="  # base64 of 32 bytes


def doc(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"uri": "s3://models/mlp.onnx"},
        "targets": [{"name": "x86"}, {"name": "arm", "compile": {"target": "aarch64"}}],
        "registration": {"bootstrapTokenSecret": {"name": "boot", "key": "token"}},
        "signing": {"keySecret": {"name": "signing", "key": "key"}},
        "packages": {"uri": "s3://pkgs/edge"},
        "redis": {"url": "redis://redis:6379/0"},
    }
    base.update(spec)
    return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "EdgeFleet",
            "metadata": {"name": "sensors", "namespace": "ml"}, "spec": base}


def planned(d: dict[str, Any]) -> FleetPlan:
    return plan_fleet(validate_edge_fleet(d["metadata"]["name"], "ml", d["spec"]), "ml")


def version(plan: FleetPlan, key: str = KEY) -> VersionStatus:
    return VersionStatus(version=plan.version, model=plan.model_uri, publicKey=key, packages=[
        PackageStatus(target=t, uri=f"s3://pkgs/edge/ml/sensors/{plan.version}/{t}.tar.gz",
                      sha256="ab" * 32, size=10, signature="c2ln") for t in plan.targets])


def objects(plan: FleetPlan, settings: OperatorSettings = SETTINGS) -> list[dict[str, Any]]:
    config = fleet_config(plan, version(plan), None)
    jobs = [rf.package_job(plan, b, uid=UID, settings=settings) for b in plan.builds]
    return jobs + rf.fleet_server_objects(plan, config, uid=UID, settings=settings)


def _example() -> dict[str, Any]:
    d: dict[str, Any] = yaml.safe_load((REPO / "examples" / "edge-fleet.yaml").read_text())
    return d


@pytest.mark.parametrize("spec", [
    {},
    {"server": {"replicas": 1}, "redis": {"urlSecret": {"name": "redis", "key": "url"}},
     "model": {"uri": "s3://models/m.tar.gz", "format": "compiled"},
     "targets": [{"name": "x86"}]},
    {"server": {"replicas": 3, "resources": {"requests": {"cpu": "1"},
                                             "limits": {"memory": "2Gi"}},
                "podTemplate": {"nodeSelector": {"kubernetes.io/arch": "amd64"},
                                "tolerations": [{"key": "edge", "operator": "Exists"}],
                                "annotations": {"example.com/team": "edge"},
                                "serviceAccountName": "fleet"}}},
], ids=["minimal", "one-replica-secret-redis", "placement"])
def test_every_object_passes_kubernetes_validate_strict(spec: dict[str, Any]) -> None:
    for settings in (OperatorSettings(), SETTINGS):
        for manifest in objects(planned(doc(**spec)), settings):
            assert schema_errors(manifest) == [], manifest["kind"]
            kubernetes_validate.validate(manifest, "1.33.0", strict=True)
    example = _example()
    for manifest in objects(plan_fleet(EdgeFleet.model_validate(
            {**example, "metadata": {**example["metadata"], "namespace": "ml"}}), "ml")):
        kubernetes_validate.validate(manifest, "1.33.0", strict=True)


def test_the_example_is_valid_on_kubernetes() -> None:
    """With its two local paths on s3:// (as its comments say), the example runs on a cluster;
    as written, a cluster refuses the relative file:// model."""
    example = _example()
    with pytest.raises(InvalidEdgeFleet, match=r"spec\.model\.uri"):
        validate_edge_fleet(example["metadata"]["name"], "ml", example["spec"])
    example["spec"]["model"]["uri"] = "s3://models/mlp.onnx"
    example["spec"]["dataCapture"]["destination"] = "s3://captures/sensors/"
    fleet = validate_edge_fleet(example["metadata"]["name"], "ml", example["spec"])
    assert [t.name for t in fleet.spec.targets] == ["x86-gateway", "arm64-board"]
    plan = plan_fleet(fleet, "ml")
    images = {b.target: rf.package_job(plan, b, uid=UID, settings=SETTINGS)["spec"][
        "template"]["spec"]["containers"][0]["image"] for b in plan.builds}
    assert images == {"x86-gateway": "example.test/rt:1", "arm64-board": "example.test/compiler:1"}


def test_package_job_arguments_are_not_expanded_by_the_kubelet() -> None:
    """The kubelet expands $(NAME) in arguments from the container's env, where the
    fleet's signing key is: a model URI naming $(KUBEINFER_EDGE_SIGNING_KEY) would put
    the key into an object key. Arguments are escaped ($$); the plan (what local mode
    runs as argv, no kubelet) is not."""
    plan = planned(doc(model={"uri": "s3://models/$(KUBEINFER_EDGE_SIGNING_KEY)/mlp.onnx"}))
    build = plan.builds[0]
    assert any("$(KUBEINFER_EDGE_SIGNING_KEY)" in a for a in build.args)
    args = rf.package_job(plan, build, uid=UID, settings=SETTINGS)["spec"]["template"][
        "spec"]["containers"][0]["args"]
    assert [a.replace("$$", "$") for a in args] == list(build.args)
    assert not any("$(" in a.replace("$$", "") for a in args)


def test_package_jobs() -> None:
    plan = planned(doc())
    jobs = {b.target: rf.package_job(plan, b, uid=UID, settings=SETTINGS) for b in plan.builds}
    arm, x86 = jobs["arm"], jobs["x86"]
    assert arm["metadata"]["name"] == plan.build("arm").job_name
    assert arm["metadata"]["name"].startswith("sensors-pkg-") and len(arm["metadata"]["name"]) <= 57
    assert arm["metadata"]["ownerReferences"] == [{
        "apiVersion": "kubeinfer.io/v1alpha1", "kind": "EdgeFleet", "name": "sensors",
        "uid": UID, "controller": True, "blockOwnerDeletion": True}]
    assert arm["metadata"]["annotations"][ANNOTATION_RUN_HASH] == plan.build("arm").run_hash
    labels = arm["spec"]["template"]["metadata"]["labels"]
    assert labels[rf.LABEL_EDGE_FLEET] == "sensors" and labels[rf.LABEL_EDGE_TARGET] == "arm"
    assert labels[rf.LABEL_EDGE_VERSION] == plan.version
    spec = arm["spec"]
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["backoffLimit"] >= 0
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob", "onExitCodes": {
        "containerName": "package", "operator": "In", "values": [42]}}
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    (c,) = pod["containers"]
    assert c["image"] == "example.test/compiler:1"
    assert x86["spec"]["template"]["spec"]["containers"][0]["image"] == "example.test/rt:1"
    assert c["args"] == ["edge", "package", "--fleet", "sensors", "--version", plan.version,
                         "--target", "arm", "--model", "s3://models/mlp.onnx",
                         "--compile-target", "aarch64", "--out", "s3://pkgs/edge/ml/sensors"]
    assert "--compile-target" not in x86["spec"]["template"]["spec"]["containers"][0]["args"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    env = {e["name"]: e for e in c["env"]}
    assert env["KUBEINFER_REPORT_FILE"]["value"] == "/dev/termination-log"
    # The signing key only by reference.
    assert env["KUBEINFER_EDGE_SIGNING_KEY"] == {
        "name": "KUBEINFER_EDGE_SIGNING_KEY",
        "valueFrom": {"secretKeyRef": {"name": "signing", "key": "key"}}}


def _server(plan: FleetPlan) -> dict[str, dict[str, Any]]:
    return {m["kind"]: m for m in objects(plan)[len(plan.builds):]}


def test_fleet_server_objects() -> None:
    plan = planned(doc())
    objs = _server(plan)
    assert set(objs) == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}
    for m in objs.values():
        assert m["metadata"]["ownerReferences"][0]["kind"] == "EdgeFleet"
        assert m["metadata"]["annotations"]["kubeinfer.io/applied-hash"]
    cm = objs["ConfigMap"]
    assert cm["metadata"]["name"] == "sensors-fleet-config"
    config = FleetConfig.model_validate_json(cm["data"]["fleet.json"])
    assert config.current.version == plan.version and config.previous is None
    assert set(config.current.packages) == {"x86", "arm"}
    assert config.heartbeatIntervalSeconds == 30 and config.publicKey == KEY
    dep = objs["Deployment"]
    assert dep["metadata"]["name"] == "sensors-fleet-server" and dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["args"] == ["serve", "--role", "fleet-server"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ping"
    assert c["livenessProbe"]["httpGet"]["path"] == "/ping"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert pod["automountServiceAccountToken"] is False
    assert {"name": "fleet-config", "configMap": {"name": "sensors-fleet-config"}} in pod[
        "volumes"]
    assert dep["spec"]["selector"]["matchLabels"] == objs["Service"]["spec"]["selector"] == \
        objs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
    assert objs["Service"]["spec"]["ports"][0]["port"] == SETTINGS.runtime_port


def test_the_server_env_is_what_the_fleet_server_reads(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    for spec, redis in (({}, "redis://redis:6379/0"),
                        ({"redis": {"urlSecret": {"name": "r", "key": "url"}}}, None)):
        dep = _server(planned(doc(**spec)))["Deployment"]
        (c,) = dep["spec"]["template"]["spec"]["containers"]
        literal = {e["name"]: e["value"] for e in c["env"] if "value" in e}
        secret = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]
                  if "valueFrom" in e}
        assert secret["KUBEINFER_BOOTSTRAP_TOKEN"] == {"name": "boot", "key": "token"}
        # The status token: the operator's, in the runtime Secret (optional: the fleet
        # server starts without it, and then only the bootstrap token reads).
        assert secret["KUBEINFER_STATUS_TOKEN"] == {"name": "kubeinfer-runtime",
                                                    "key": "edge-status-sensors",
                                                    "optional": True}
        if redis is None:
            assert secret["KUBEINFER_REDIS_URL"] == {"name": "r", "key": "url"}
            assert "KUBEINFER_REDIS_URL" not in literal
        else:
            assert literal["KUBEINFER_REDIS_URL"] == redis and len(secret) == 2
        assert literal["KUBEINFER_FLEET_CONFIG_FILE"] == "/etc/kubeinfer/fleet/fleet.json"
        for name, value in literal.items():
            monkeypatch.setenv(name, value)
        for name in secret:
            monkeypatch.setenv(name, "redis://r:6379/1" if "REDIS" in name else "t" * 24)
        settings = FleetServerSettings()  # type: ignore[call-arg]
        assert settings.status_token is not None
        assert settings.fleet_config_file == "/etc/kubeinfer/fleet/fleet.json"
        assert settings.port == SETTINGS.runtime_port
        mount = next(m for m in c["volumeMounts"] if m["name"] == "fleet-config")
        assert settings.fleet_config_file.startswith(mount["mountPath"] + "/")


def test_secrets_are_only_ever_referenced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-leak")
    monkeypatch.setenv("KUBEINFER_BOOTSTRAP_TOKEN", "token-leak-token-leak")
    monkeypatch.setenv("KUBEINFER_EDGE_SIGNING_KEY", "key-leak")
    text = json.dumps(objects(planned(doc())))
    assert "leak" not in text


def test_the_status_token_rolls_the_fleet_server_and_is_never_written_out() -> None:
    plan = planned(doc())
    config = fleet_config(plan, version(plan), None)

    def deployment(token: str | None) -> dict[str, Any]:
        return next(m for m in rf.fleet_server_objects(plan, config, uid=UID, settings=SETTINGS,
                                                       status_token=token)
                    if m["kind"] == "Deployment")

    one, two = "s" * 43, "t" * 43
    a, b = deployment(one), deployment(two)
    hashes = [d["spec"]["template"]["metadata"]["annotations"][ANNOTATION_SECRET_HASH]
              for d in (a, b)]
    assert hashes[0] != hashes[1]  # a new token rolls the pods (env is read at start)
    assert hashes[0] == rf.status_token_hash(one)
    assert one not in json.dumps(a) and two not in json.dumps(b)
    assert a["metadata"]["annotations"]["kubeinfer.io/applied-hash"] != \
        b["metadata"]["annotations"]["kubeinfer.io/applied-hash"]
    assert ANNOTATION_SECRET_HASH not in (
        deployment(None)["spec"]["template"]["metadata"].get("annotations") or {})
    assert schema_errors(a) == []


def test_the_runtime_secret_keeps_status_tokens_apart_from_endpoint_keys() -> None:
    settings = OperatorSettings(redis_url="redis://:pw@redis:6379/0")
    owner = rf.runtime_secret_owner("sensors", UID)
    assert (owner["kind"], owner["uid"], owner["controller"],
            owner["blockOwnerDeletion"]) == ("EdgeFleet", UID, False, False)
    token = "u" * 43
    secret = secrets.runtime_secret("ml", settings, [owner],
                                    extra={secrets.edge_status_key("sensors"): token})
    assert secret["metadata"]["name"] == "kubeinfer-runtime"
    data = secret["data"]
    assert set(data) == {"redis-url", "edge-status-sensors"}
    assert base64.b64decode(data["edge-status-sensors"]).decode() == token
    assert secrets.status_token_of(data, "sensors") == token
    assert secrets.status_token_of(data, "other") is None
    # Unreadable or too short: replaced by the operator.
    assert secrets.status_token_of({"edge-status-x": "not base64!"}, "x") is None
    assert secrets.status_token_of({"edge-status-x": secrets.encode("short")}, "x") is None
    # Endpoints compare and prune only their own keys: a fleet's token is never dropped.
    assert secrets.endpoint_keys(data) == secrets.runtime_secret_data("ml", settings)


def test_one_replica_gets_no_disruption_budget() -> None:
    objs = _server(planned(doc(server={"replicas": 1})))
    assert "PodDisruptionBudget" not in objs and objs["Deployment"]["spec"]["replicas"] == 1


def test_a_spec_change_of_model_or_targets_is_a_new_version() -> None:
    base = planned(doc())
    assert len(base.version) == 10
    same = planned(doc(rollout={"waves": [{"percentage": 50}]}, heartbeatIntervalSeconds=5,
                       server={"replicas": 4}))
    assert same.version == base.version  # rollout, heartbeat, server: same packages
    reordered = planned(doc(targets=[{"name": "arm", "compile": {"target": "aarch64"}},
                                     {"name": "x86"}]))
    assert reordered.version == base.version
    for change in ({"model": {"uri": "s3://models/mlp-v2.onnx"}},
                   {"targets": [{"name": "x86"}]},
                   {"targets": [{"name": "x86"}, {"name": "arm",
                                                  "compile": {"target": "armv7"}}]}):
        changed = planned(doc(**change))
        assert changed.version != base.version, change
        # Package Jobs are per version: the new version's never collide with the old's.
        assert {b.job_name for b in changed.builds}.isdisjoint(
            {b.job_name for b in base.builds})


def test_the_previous_version_is_kept_for_rollback() -> None:
    old, new = planned(doc()), planned(doc(model={"uri": "s3://models/mlp-v2.onnx"}))
    config = fleet_config(new, version(new), version(old))
    assert config.current.version == new.version
    assert config.previous is not None and config.previous.version == old.version
    # A rotated signing key: the old packages would not verify, so no rollback target.
    assert fleet_config(new, version(new), version(old, "B" * 43 + "=")).previous is None
    # The same version twice is no rollback target either.
    assert fleet_config(new, version(new), version(new)).previous is None


@pytest.mark.parametrize(("change", "fragment"), [
    ({"packages": {"uri": "file:///tmp/pkgs"}}, "spec.packages.uri"),
    ({"model": {"uri": "file://models/mlp.onnx"}}, "spec.model.uri"),
    ({"redis": {"url": "redis://:hunter2@redis:6379/0"}}, "urlSecret"),
    ({"redis": {}}, "set exactly one"),
    ({"targets": [{"name": "a"}, {"name": "a"}]}, "named more than once"),
    ({"targets": [{"name": "a", "compile": {"target": "native"}}]}, "native"),
    ({"model": {"uri": "s3://m/a.tar.gz", "format": "compiled"},
      "targets": [{"name": "a", "compile": {"target": "aarch64"}}]}, "remove compile"),
    ({"dataCapture": {"samplingPercentage": 5}}, "spec.dataCapture.destination"),
    ({"server": {"resources": {"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}}}},
     "spec.server.resources"),
])
def test_invalid_specs_name_the_field(change: dict[str, Any], fragment: str) -> None:
    d = doc(**change)
    with pytest.raises(InvalidEdgeFleet) as info:
        validate_edge_fleet("sensors", "ml", d["spec"])
    assert fragment in str(info.value)
    assert not str(info.value).endswith(".")


def test_a_name_too_long_is_refused() -> None:
    with pytest.raises(InvalidEdgeFleet, match=r"metadata\.name"):
        validate_edge_fleet("x" * 41, "ml", copy.deepcopy(doc()["spec"]))


def test_package_jobs_take_the_operators_default_placement() -> None:
    settings = SETTINGS.model_copy(update={"default_pod_template": {
        "nodeSelector": {"pool": "build"}, "imagePullSecrets": [{"name": "registry"}]}})
    plan = planned(doc())
    for build in plan.builds:
        job = rf.package_job(plan, build, uid=UID, settings=settings)
        pod = job["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"pool": "build"}
        assert pod["imagePullSecrets"] == [{"name": "registry"}]
        assert schema_errors(job) == []
