"""The env a spec may add to kubeinfer's containers (``api.env_policy``), for every kind.

A tenant who may create kubeinfer resources must not override the operator's own settings
in the pods it renders: the audit's payloads (a TransformJob's model env pointing its input
at the service-account token and its output at another bucket, ``LD_PRELOAD`` and
``PYTHONPATH`` in a variant or a CompilationJob, a variant's own
``KUBEINFER_OUTBOUND_ALLOW`` and Redis URL) are refused naming the field and the key, a
pinned model is held to what a fresh one passes, the operator's values win every merge,
and the tuning users are told to set stays theirs. The names each renderer reserves are
held equal to what it renders.
"""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest

from kubeinfer_operator.api import env_policy
from kubeinfer_operator.api.compilation_job import CompilationJob
from kubeinfer_operator.api.endpoint import Endpoint
from kubeinfer_operator.api.recommendation_job import RecommendationJob
from kubeinfer_operator.api.transform_job import TransformJob
from kubeinfer_operator.errors import SpecError
from kubeinfer_operator.handlers.transform_sync import _pinned
from kubeinfer_operator.local.manifest import parse_manifests
from kubeinfer_operator.reconcile import validate
from kubeinfer_operator.reconcile.validate import InvalidSpec, validate_endpoint
from kubeinfer_operator.render import compile_plan, transform_plan
from kubeinfer_operator.render.async_plan import WORKER_ENV
from kubeinfer_operator.render.k8s import Owner, render_endpoint
from kubeinfer_operator.render.k8s_workloads import RUNTIME_CONTAINER_ENV
from kubeinfer_operator.render.plan import SERVER_ENV, plan_endpoint
from kubeinfer_operator.render.plan_steps import IMAGE_STEP_ENV
from kubeinfer_operator.render.recommend_jobs import RecommendSpecError, plan_recommend
from kubeinfer_operator.render.transform_jobs import render_job
from kubeinfer_operator.render.transform_names import Step
from kubeinfer_operator.render.transform_plan import (
    ResolvedModel,
    model_from_endpoint,
    own_model,
    plan_transform,
)
from kubeinfer_operator.settings import OperatorSettings
from kubeinfer_runtime.contract import ENV_PREFIX
from kubeinfer_runtime.contract.async_paths import FORMER_PATHS_ENV
from tests.support.kubelet import expand

OWNER = Owner(name="e", namespace="tenant-a", uid="0b6c2a3e-1111-4222-8333-944455556666")
SETTINGS = OperatorSettings(s3_secret_name="s3-creds", redis_url="redis://:pw@redis:6379/0",
                            runtime_image="example.test/rt:1")
#: The audit's TransformJob model env (tj.py): a pin written by hand.
HOSTILE_PIN = json.dumps({
    "source": "Endpoint e variant v: model s3://m/m.onnx",
    "containers": [{"name": "img", "image": "attacker/img:1"}],
    "env": [{"name": "KUBEINFER_INPUT_URI",
             "value": "file:///var/run/secrets/kubernetes.io/serviceaccount/"},
            {"name": "KUBEINFER_OUTPUT_URI", "value": "s3://attacker-bucket/loot/"},
            {"name": "JOB_COMPLETION_INDEX", "value": "0"},
            {"name": "LD_PRELOAD", "value": "/tmp/x.so"}]})
#: Env users are told to set (README, examples, tests): never refused.
KNOBS = ["KUBEINFER_WORKERS", "KUBEINFER_INTRA_OP_THREADS", "KUBEINFER_INFERENCE_THREADS",
         "KUBEINFER_LOG_LEVEL", "KUBEINFER_MAX_DECODED_BYTES", "KUBEINFER_ADMIN_API",
         "KUBEINFER_INLINE_HTTP", "KUBEINFER_HTTP_MAX_HEADER_BYTES",
         "KUBEINFER_HTTP_MAX_HEADER_LINE_BYTES", "KUBEINFER_HTTP_MAX_HEADERS",
         "KUBEINFER_HTTP_HEADER_TIMEOUT_S", "KUBEINFER_HTTP_BODY_TIMEOUT_S",
         "KUBEINFER_HTTP_BODY_MIN_RATE_BYTES_S", "KUBEINFER_HTTP_KEEPALIVE_TIMEOUT_S",
         "KUBEINFER_HTTP_MAX_CONNECTIONS", "OMP_NUM_THREADS", "MODEL_SERVER_WORKERS"]


def _env(*names: str) -> list[dict[str, str]]:
    return [{"name": n, "value": "1"} for n in names]


def _endpoint_spec(env: list[dict[str, str]], **spec: Any) -> dict[str, Any]:
    return {"variants": [{"name": "v", "model": {"uri": "s3://m/m.onnx"}, "env": env}], **spec}


ASYNC: dict[str, Any] = {"type": "Async", "async": {"outputPath": "s3://tenant-bucket/out"}}


def _problems(spec: dict[str, Any]) -> list[str]:
    with pytest.raises(InvalidSpec) as exc:
        validate_endpoint("e", "tenant-a", spec)
    return exc.value.problems


def _transform(**spec: Any) -> TransformJob:
    base: dict[str, Any] = {"model": {"uri": "s3://m/m.onnx"}, "input": {"uri": "s3://t/in/"},
                            "output": {"uri": "s3://t/out/"}}
    base.update(spec)
    return TransformJob.model_validate({"apiVersion": "kubeinfer.io/v1alpha1",
                                        "kind": "TransformJob",
                                        "metadata": {"name": "j", "namespace": "tenant-a"},
                                        "spec": {k: v for k, v in base.items()
                                                 if v is not None}})


def _compile(environment: dict[str, str], **spec: Any) -> CompilationJob:
    return CompilationJob.model_validate({
        "apiVersion": "kubeinfer.io/v1alpha1", "kind": "CompilationJob",
        "metadata": {"name": "c", "namespace": "tenant-a"},
        "spec": {"model": {"uri": "s3://t/m.onnx"}, "output": {"uri": "s3://t/out/"},
                 "target": "native", "environment": environment, **spec}})


# -- the audit's payloads -------------------------------------------------------------------


def test_an_async_variant_cannot_hijack_the_worker_or_widen_its_allow_list() -> None:
    problems = _problems(_endpoint_spec(_env(
        "LD_PRELOAD", "PYTHONPATH", "KUBEINFER_OUTBOUND_ALLOW", "KUBEINFER_REDIS_URL"), **ASYNC))
    assert problems == [
        "spec.variants[0].env[0].name: LD_PRELOAD would change which code kubeinfer's image "
        "loads (the dynamic loader's or Python's start-up); remove it from the spec",
        "spec.variants[0].env[1].name: PYTHONPATH would change which code kubeinfer's image "
        "loads (the dynamic loader's or Python's start-up); remove it from the spec",
        "spec.variants[0].env[2].name: KUBEINFER_OUTBOUND_ALLOW is set by the operator; "
        "remove it from the spec",
        "spec.variants[0].env[3].name: KUBEINFER_REDIS_URL is set by the operator; remove it "
        "from the spec"]


@pytest.mark.parametrize("name", ["KUBEINFER_MODEL_URI", "KUBEINFER_PIPELINE",
                                  "KUBEINFER_MULTI_MODEL_PREFIX", "KUBEINFER_MODEL_FORMAT",
                                  "KUBEINFER_METRICS_PORT", "KUBEINFER_PORT", "KUBEINFER_HOST",
                                  "LD_LIBRARY_PATH", "LD_AUDIT", "PYTHONHOME", "PYTHONSTARTUP",
                                  "PYTHONUSERBASE", "PYTHONINSPECT", "PATH",
                                  "KUBEINFER_OUTBOUND_ALLOW", "KUBEINFER_SCALER_TOKEN",
                                  "KUBEINFER_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL",
                                  "AWS_SECRET_ACCESS_KEY"])
def test_a_real_time_variant_or_shadow_cannot_set_what_the_operator_renders(name: str) -> None:
    assert _problems(_endpoint_spec(_env(name)))[0].startswith(
        f"spec.variants[0].env[0].name: {name} ")
    shadow = {"name": "s", "model": {"uri": "s3://m/m.onnx"}, "env": _env("OK", name)}
    assert _problems(_endpoint_spec([], shadowVariants=[shadow]))[0].startswith(
        f"spec.shadowVariants[0].env[1].name: {name} ")


def test_async_settings_are_the_operators_on_async_endpoints_only() -> None:
    for name in ("KUBEINFER_QUEUE", "KUBEINFER_INPUT_PATHS", "KUBEINFER_MAX_PAYLOAD_BYTES",
                 "KUBEINFER_TRANSIENT_BUDGET_S", "KUBEINFER_SUCCESS_URL"):
        assert _problems(_endpoint_spec(_env(name), **ASYNC))[0].startswith(
            f"spec.variants[0].env[0].name: {name} is set by the operator")
    # A real-time model server's payload bound is the user's to tune.
    validate_endpoint("e", "tenant-a", _endpoint_spec(_env("KUBEINFER_MAX_PAYLOAD_BYTES")))


def test_an_image_step_is_the_users_image_but_its_port_is_the_operators() -> None:
    spec = {"variants": [{"name": "v", "containers": [
        {"name": "img", "image": "example.test/img:1",
         "env": _env("LD_LIBRARY_PATH", "PYTHONPATH", "AWS_REGION", "SAGEMAKER_BIND_TO_PORT")}]}]}
    assert _problems(spec) == [
        "spec.variants[0].containers[0].env[3].name: SAGEMAKER_BIND_TO_PORT is set by the "
        "operator; remove it from the spec"]


def test_local_mode_holds_a_manifest_to_the_same_policy() -> None:
    text = json.dumps({"apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint",
                       "metadata": {"name": "e"},
                       "spec": _endpoint_spec(_env("KUBEINFER_WORKERS", "LD_PRELOAD"))})
    with pytest.raises(SpecError) as exc:
        parse_manifests(text, source="e.yaml", base_dir="/tmp")
    assert ("spec.variants[0].env[1].name: LD_PRELOAD would change which code kubeinfer's "
            "image loads") in str(exc.value)
    assert "KUBEINFER_WORKERS" not in str(exc.value)


def test_a_transform_model_env_cannot_redirect_the_job_or_preload_a_library() -> None:
    job = _transform(model=None, endpointRef={"name": "e"})
    with pytest.raises(SpecError) as exc:
        plan_transform(job, ResolvedModel.model_validate_json(HOSTILE_PIN))
    message = str(exc.value)
    for j, name in enumerate(["KUBEINFER_INPUT_URI", "KUBEINFER_OUTPUT_URI",
                              "JOB_COMPLETION_INDEX"]):
        assert (f"spec.endpointRef: Endpoint e: env[{j}].name: {name} is set by the operator; "
                "remove it from the spec") in message
    assert "env[3].name: LD_PRELOAD would change which code kubeinfer's image loads" in message


def test_an_endpoint_variants_env_is_held_to_the_batch_workers_policy() -> None:
    # tj_ref.py: valid for the Endpoint (a model server reads neither), not for the job.
    endpoint = validate_endpoint("e", "tenant-a", _endpoint_spec(_env(
        "KUBEINFER_INPUT_URI", "KUBEINFER_SHARDS", "KUBEINFER_INFERENCE_THREADS")))
    job = _transform(model=None, endpointRef={"name": "e"})
    with pytest.raises(SpecError) as exc:
        plan_transform(job, model_from_endpoint(job.spec, endpoint, "tenant-a"))
    assert "env[0].name: KUBEINFER_INPUT_URI is set by the operator" in str(exc.value)
    assert "env[1].name: KUBEINFER_SHARDS is set by the operator" in str(exc.value)
    assert "KUBEINFER_INFERENCE_THREADS" not in str(exc.value)


@pytest.mark.parametrize("name", ["KUBEINFER_OUTPUT_URI", "KUBEINFER_MODEL_URL",
                                  "KUBEINFER_MAX_BATCH_PAYLOAD_BYTES", "KUBEINFER_PIPELINE",
                                  "KUBEINFER_MODEL_CACHE_DIR", "SAGEMAKER_MAX_PAYLOAD_IN_MB",
                                  "SAGEMAKER_BIND_TO_PORT", "LD_PRELOAD", "PYTHONPATH",
                                  "KUBEINFER_REDIS_URL"])
def test_a_transform_jobs_environment_cannot_set_the_operators_settings(name: str) -> None:
    # Including what this spec leaves unset (no image model: no KUBEINFER_MODEL_URL).
    job = _transform(environment={name: "x"})
    with pytest.raises(SpecError) as exc:
        plan_transform(job, own_model(job.spec))  # type: ignore[arg-type]
    assert f"spec.environment.{name}: {name} " in str(exc.value)


@pytest.mark.parametrize("name", ["kubeinfer_outbound_allow", "kubeinfer_redis_url",
                                  "Kubeinfer_Model_Uri", "KUBEINFER_input_uri",
                                  "kubeinfer_workers"])
def test_a_kubeinfer_setting_in_any_other_case_is_refused_not_ignored(name: str) -> None:
    """The runtime reads ``KUBEINFER_*`` in upper case only (it used to match any case, the
    later spelling winning: ``kubeinfer_outbound_allow`` replaced the operator's allow-list
    past these checks, which compare names as written). Refused in every kind's env."""
    said = f"{name} is not read: kubeinfer reads its settings by their upper-case names"
    assert said in _problems(_endpoint_spec(_env(name)))[0]
    assert said in _problems(_endpoint_spec(_env(name), **ASYNC))[0]
    job = _transform(environment={name: "x"})
    with pytest.raises(SpecError, match=f"spec.environment.{name}: {name} is not read"):
        plan_transform(job, own_model(job.spec))  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="is not read"):
        compile_plan.plan_compile(_compile({name: "x"}))
    # A user's own image reads its env as it likes.
    image = _transform(model=None, containers=[{"name": "m", "image": "example.test/m:1"}],
                       environment={"kubeinfer_flavour": "fast"})
    assert plan_transform(image, own_model(image.spec)).image_env[  # type: ignore[arg-type]
        "m"]["kubeinfer_flavour"] == "fast"


@pytest.mark.parametrize("name", sorted(env_policy.RESOLVER_ENV))
def test_the_resolver_is_the_operators(name: str) -> None:
    """The pod's DNS is the operator's (a podTemplate has no dnsConfig): search domains or
    resolver options from a spec would look the object store's and Redis's hosts up where
    the spec says (Redis's AUTH then goes to that host)."""
    said = f"{name} would change how kubeinfer's image resolves host names"
    assert said in _problems(_endpoint_spec(_env(name)))[0]
    assert said in _problems(_endpoint_spec(_env(name), **ASYNC))[0]
    job = _transform(environment={name: "x"})
    with pytest.raises(SpecError, match=said):
        plan_transform(job, own_model(job.spec))  # type: ignore[arg-type]
    with pytest.raises(SpecError, match=said):
        compile_plan.plan_compile(_compile({name: "x"}))
    image = _transform(model=None, containers=[{"name": "m", "image": "example.test/m:1"}],
                       environment={name: "x"})
    assert plan_transform(image, own_model(image.spec)).image_env[  # type: ignore[arg-type]
        "m"][name] == "x"


def test_an_image_models_environment_is_the_users_image() -> None:
    job = _transform(model=None, containers=[{"name": "m", "image": "example.test/m:1"}],
                     environment={"LD_LIBRARY_PATH": "/opt/lib", "MODEL_FLAVOUR": "fast"})
    plan = plan_transform(job, own_model(job.spec))  # type: ignore[arg-type]
    assert plan.image_env["m"]["LD_LIBRARY_PATH"] == "/opt/lib"
    assert "LD_LIBRARY_PATH" not in plan.env


def test_a_compilation_job_cannot_preload_or_pick_its_compiler() -> None:
    job = _compile({"LD_PRELOAD": "/tmp/x.so", "PYTHONPATH": "/tmp", "CC": "/tmp/evil",
                    "TVM_LIBRARY_PATH": "/tmp", "KUBEINFER_TUNING_TRIALS": "9"})
    with pytest.raises(SpecError) as exc:
        compile_plan.plan_compile(job)
    message = str(exc.value)
    assert ("spec.environment.LD_PRELOAD: LD_PRELOAD would change which code kubeinfer's "
            "image loads") in message
    assert "spec.environment.PYTHONPATH: PYTHONPATH would change" in message
    assert ("spec.environment.CC: CC would change the compiler, headers or libraries "
            "kubeinfer's compiler uses; remove it from the spec") in message
    assert "spec.environment.TVM_LIBRARY_PATH: TVM_LIBRARY_PATH would change" in message
    # Unset in this spec (no tuning.trials) and still the operator's: the spec field says it.
    assert "spec.environment.KUBEINFER_TUNING_TRIALS: KUBEINFER_TUNING_TRIALS is set by the " \
           "operator" in message


def test_a_recommendation_jobs_candidates_take_the_variants_env_only_if_allowed() -> None:
    job = RecommendationJob.model_validate({
        "apiVersion": "kubeinfer.io/v1alpha1", "kind": "RecommendationJob",
        "metadata": {"name": "r", "namespace": "tenant-a"},
        "spec": {"endpointRef": {"name": "e"}}})
    endpoint = {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint",
                "metadata": {"name": "e", "namespace": "tenant-a"},
                "spec": _endpoint_spec(_env("KUBEINFER_WORKERS", "LD_PRELOAD"))}
    with pytest.raises(RecommendSpecError) as exc:
        plan_recommend(job, "tenant-a", endpoint)
    assert str(exc.value).startswith("Endpoint e: spec.variants[0].env[1].name: LD_PRELOAD ")
    endpoint["spec"] = _endpoint_spec(_env("KUBEINFER_WORKERS"))
    assert plan_recommend(job, "tenant-a", endpoint).variant == "v"


# -- the pinned model ------------------------------------------------------------------------


def test_a_hand_written_pin_is_refused_and_a_good_one_read_without_a_base_dir() -> None:
    assert _pinned(HOSTILE_PIN, "j") is None
    # An image step's port taken twice, a prefix as a model, neither model nor containers.
    for pin in ({"source": "x", "containers": [{"name": "a", "image": "i:1", "port": 9000},
                                                {"name": "b", "image": "i:1", "port": 9000}]},
                {"source": "x", "model": {"uri": "s3://m/prefix/"}},
                {"source": "x"}, {"source": "x", "containers": []}):
        assert _pinned(json.dumps(pin), "j") is None, pin
    good = ResolvedModel.model_validate({"source": "Endpoint e variant v: model s3://m/m.onnx",
                                         "model": {"uri": "s3://m/m.onnx"},
                                         "env": _env("KUBEINFER_INFERENCE_THREADS"),
                                         "base_dir": "/var/run/secrets"})
    pinned = _pinned(good.model_dump_json(), "j")
    assert pinned is not None and pinned.base_dir is None
    assert pinned.env == good.env


# -- the operator's values win ---------------------------------------------------------------


def _runtime_env(doc: dict[str, Any], settings: OperatorSettings = SETTINGS) -> list[Any]:
    """The variant container's env, rendered from an Endpoint that skipped validation."""
    endpoint = Endpoint.model_validate({"apiVersion": "kubeinfer.io/v1alpha1",
                                        "kind": "Endpoint",
                                        "metadata": {"name": "e", "namespace": "tenant-a"},
                                        "spec": doc})
    for manifest in render_endpoint(plan_endpoint(endpoint, generation=1), OWNER, settings):
        if manifest["kind"] == "Deployment" and manifest["metadata"]["name"] == "e-v":
            kubernetes_validate.validate(manifest, "1.33.0", strict=True)
            env: list[Any] = manifest["spec"]["template"]["spec"]["containers"][0]["env"]
            return env
    raise AssertionError("no variant Deployment")


def test_rendered_env_keeps_the_operators_values_over_an_unvalidated_spec() -> None:
    env = _runtime_env(_endpoint_spec([
        {"name": "KUBEINFER_MODEL_URI", "value": "s3://attacker/m.onnx"},
        {"name": "KUBEINFER_OUTBOUND_ALLOW", "value": "169.254.0.0/16,kubernetes.default.svc"},
        {"name": "KUBEINFER_REDIS_URL", "value": "redis://attacker:6379/0"},
        {"name": "KUBEINFER_PORT", "value": "1"},
        {"name": "KUBEINFER_WORKERS", "value": "2"}], **ASYNC))
    names = [e["name"] for e in env]
    assert len(names) == len(set(names)), names
    by_name = {e["name"]: e for e in env}
    assert by_name["KUBEINFER_MODEL_URI"]["value"] == "s3://m/m.onnx"
    # Rendered even empty: the operator's allow-list (none) is the worker's.
    assert by_name["KUBEINFER_OUTBOUND_ALLOW"]["value"] == ""
    assert "valueFrom" in by_name["KUBEINFER_REDIS_URL"]
    assert by_name["KUBEINFER_PORT"]["value"] == str(SETTINGS.runtime_port)
    assert by_name["KUBEINFER_WORKERS"]["value"] == "2"
    allowing = SETTINGS.model_copy(update={"outbound_allow": "10.0.0.0/8"})
    by_name = {e["name"]: e for e in _runtime_env(_endpoint_spec([], **ASYNC), allowing)}
    assert by_name["KUBEINFER_OUTBOUND_ALLOW"]["value"] == "10.0.0.0/8"


def test_operator_wins_keeps_the_operators_order_and_values() -> None:
    merged = env_policy.operator_wins({"A": "op", "B": "op"}, {"B": "user", "C": "user"})
    assert list(merged.items()) == [("A", "op"), ("B", "op"), ("C", "user")]


# -- documented knobs stay the user's --------------------------------------------------------


def test_documented_knobs_are_accepted_everywhere() -> None:
    validate_endpoint("e", "tenant-a", _endpoint_spec(_env(*KNOBS)))
    validate_endpoint("e", "tenant-a", _endpoint_spec(_env(
        *KNOBS, "KUBEINFER_TRANSIENT_BACKOFF_S", "KUBEINFER_TRANSIENT_BACKOFF_MAX_S",
        "KUBEINFER_HELD_THREADS_LIVENESS_S"), **ASYNC))
    job = _transform(environment={"OMP_NUM_THREADS": "1", "KUBEINFER_INFERENCE_THREADS": "2",
                                  "KUBEINFER_SHARD_BYTES": "1048576"})
    plan = plan_transform(job, own_model(job.spec))  # type: ignore[arg-type]
    assert plan.env["KUBEINFER_INFERENCE_THREADS"] == "2"
    compiled = compile_plan.plan_compile(_compile({
        "KUBEINFER_MEASURE_S": "0.2", "KUBEINFER_MIN_SPEEDUP": "1.1", "OMP_NUM_THREADS": "2",
        "TVM_NUM_THREADS": "2"}))
    assert compiled.env["KUBEINFER_MEASURE_S"] == "0.2"


# -- each reserved set is what its renderer renders ------------------------------------------


def _server_names(spec: dict[str, Any]) -> set[str]:
    return {e["name"] for e in _runtime_env(spec, SETTINGS.model_copy(
        update={"outbound_allow": "10.0.0.0/8"}))}


def test_the_variant_sets_are_what_the_renderers_render() -> None:
    single = _endpoint_spec([])
    multi = {"variants": [{"name": "v", "multiModel": {"prefix": "s3://m/models/"}}]}
    steps = {"variants": [{"name": "v", "containers": [
        {"name": "a", "model": {"uri": "s3://m/a.onnx"}}]}]}
    realtime = set().union(*(_server_names(s) for s in (single, multi, steps)))
    assert realtime == SERVER_ENV | RUNTIME_CONTAINER_ENV
    webhooks = {"notification": {"successUrl": "https://hooks.example/ok",
                                 "errorUrl": "https://hooks.example/err"}}
    asynchronous = _server_names(_endpoint_spec(
        [], type="Async", **{"async": {**ASYNC["async"], **webhooks}}))
    # The former paths are rendered once the paths changed (tests/unit/test_async_paths.py).
    assert asynchronous - realtime == (WORKER_ENV - {FORMER_PATHS_ENV}) | {
        "KUBEINFER_OUTBOUND_ALLOW"}
    # The rest is local mode's (``local.children``, ``local.supervisor``, ``async_local``).
    assert validate.variant_operator_env(False) - realtime == validate.LOCAL_SERVER_ENV
    assert (validate.variant_operator_env(True) - realtime - asynchronous - {FORMER_PATHS_ENV}
            == validate.LOCAL_SERVER_ENV | validate.LOCAL_WORKER_ENV)


def test_the_batch_set_is_what_the_transform_plan_renders() -> None:
    full = {"input": {"uri": "s3://t/in/", "contentType": "text/csv", "splitType": "Line"},
            "output": {"uri": "s3://t/out/", "accept": "text/csv", "assembleWith": "Line"},
            "batchStrategy": "MultiRecord", "maxPayloadInMB": 1, "maxConcurrentTransforms": 2}
    rendered: set[str] = set()
    for model in ({"model": {"uri": "s3://m/m.onnx"}},
                  {"model": None, "containers": [{"name": "m", "image": "example.test/m:1"}]},
                  {"model": None, "containers": [{"name": "a", "model": {"uri": "s3://m/a"}},
                                                 {"name": "b", "image": "example.test/b:1"}]}):
        job = _transform(**full, **model)
        plan = plan_transform(job, own_model(job.spec))  # type: ignore[arg-type]
        rendered |= set(plan.env)
        for step in Step:
            container = render_job(plan, step, namespace="tenant-a", uid=OWNER.uid,
                                   settings=SETTINGS)["spec"]["template"]["spec"]
            assert {e["name"] for e in container["containers"][0]["env"]} == set(plan.env)
            for sidecar in container.get("initContainers", []):
                assert {e["name"] for e in sidecar["env"]} == transform_plan.SAGEMAKER_ENV
    assert rendered == {ENV_PREFIX + f.upper() for f in transform_plan.RENDERED_FIELDS}
    assert IMAGE_STEP_ENV <= transform_plan.SAGEMAKER_ENV


def test_the_compiler_set_is_what_the_compile_plan_renders() -> None:
    plan = compile_plan.plan_compile(_compile(
        {}, batchSizes=[1, 8], threads=2,
        tuning={"budgetSeconds": 1, "trials": 2, "cacheUri": "s3://cache/t"},
        quantization={"allowed": True, "calibrationUri": "s3://d/c.npz"}))
    assert set(plan.env) == {ENV_PREFIX + f.upper() for f in compile_plan.RENDERED_FIELDS}


# -- the kubelet's $(NAME) expansion ----------------------------------------------------------


SECRET_ENV = {"AWS_SECRET_ACCESS_KEY": "s3-secret", "KUBEINFER_REDIS_URL": "redis://:pw@r",
              "KUBEINFER_SCALER_TOKEN": "scaler-token"}


def test_a_spec_value_cannot_expand_a_secret_in_kubeinfers_containers() -> None:
    """The kubelet expands $(NAME) in env values from the container's other variables,
    those filled from Secrets included: a model URI or a variant's env value naming
    $(AWS_SECRET_ACCESS_KEY) would carry the object store's key to a log or an object
    key. Every literal value reaches the process exactly as the spec wrote it."""
    sneaky = "s3://m/$(AWS_SECRET_ACCESS_KEY)/m$$.onnx"
    env = _runtime_env(_endpoint_spec(
        [{"name": "NOTE", "value": "$(KUBEINFER_REDIS_URL) $(KUBEINFER_SCALER_TOKEN) $5"}],
        **ASYNC) | {"variants": [{"name": "v", "model": {"uri": sneaky}, "env": [
            {"name": "NOTE", "value": "$(KUBEINFER_REDIS_URL) $(KUBEINFER_SCALER_TOKEN) $5"}]}]})
    seen = {e["name"]: expand(e["value"], SECRET_ENV) for e in env if "value" in e}
    assert seen["KUBEINFER_MODEL_URI"] == sneaky
    assert seen["NOTE"] == "$(KUBEINFER_REDIS_URL) $(KUBEINFER_SCALER_TOKEN) $5"
    assert not any(secret in v for v in seen.values() for secret in SECRET_ENV.values())

    job = _transform(output={"uri": "s3://out/$(AWS_SECRET_ACCESS_KEY)/", "accept": "text/csv"})
    plan = plan_transform(job, own_model(job.spec))  # type: ignore[arg-type]
    pod = render_job(plan, Step.WORK, namespace="tenant-a", uid=OWNER.uid,
                     settings=SETTINGS)["spec"]["template"]["spec"]
    seen = {e["name"]: expand(e["value"], SECRET_ENV)
            for e in pod["containers"][0]["env"] if "value" in e}
    assert seen["KUBEINFER_OUTPUT_URI"] == "s3://out/$(AWS_SECRET_ACCESS_KEY)/"


def test_a_users_own_image_keeps_its_expansion() -> None:
    """No Secret of kubeinfer's is in a user's image container: $(NAME) there is the
    user's Kubernetes feature, rendered as written."""
    job = _transform(model=None, containers=[{"name": "m", "image": "example.test/m:1"}],
                     environment={"GREETING": "$(HOSTNAME)"})
    plan = plan_transform(job, own_model(job.spec))  # type: ignore[arg-type]
    pod = render_job(plan, Step.WORK, namespace="tenant-a", uid=OWNER.uid,
                     settings=SETTINGS)["spec"]["template"]["spec"]
    sidecar = {e["name"]: e.get("value") for e in pod["initContainers"][0]["env"]}
    assert sidecar["GREETING"] == "$(HOSTNAME)"
