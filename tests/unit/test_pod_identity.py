"""Every pod the operator renders, of every kind, mounts no Kubernetes API token, whatever
ServiceAccount a podTemplate (the object's or the operator's default) names, and every one
of its containers has cpu and memory requests and a memory limit.

The pods run tenants' images, handlers and models: a ServiceAccount's API token in them
would give whoever may create a kubeinfer object that ServiceAccount's RBAC. No pod the
operator renders calls the API, so none needs a token. All manifests pass
kubernetes-validate (strict)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubeinfer_operator.api.compilation_job import CompilationJob
from kubeinfer_operator.api.edge_fleet import EdgeFleet, PackageStatus, VersionStatus
from kubeinfer_operator.api.endpoint import Endpoint
from kubeinfer_operator.api.recommendation_job import RecommendationJob
from kubeinfer_operator.api.transform_job import TransformJob
from kubeinfer_operator.render import compile_jobs, recommend_jobs
from kubeinfer_operator.render import edge_fleet as fleet_render
from kubeinfer_operator.render.compile_plan import plan_compile
from kubeinfer_operator.render.edge_plan import fleet_config, plan_fleet
from kubeinfer_operator.render.k8s import Owner, render_endpoint
from kubeinfer_operator.render.plan import plan_endpoint
from kubeinfer_operator.render.transform_jobs import render_job as render_transform_job
from kubeinfer_operator.render.transform_names import Step
from kubeinfer_operator.render.transform_plan import own_model, plan_transform
from kubeinfer_operator.settings import OperatorSettings

REPO = Path(__file__).resolve().parents[2]
UID = "0b6c2a3e-1111-4222-8333-944455556666"
#: A ServiceAccount a tenant names: say, one bound to a deploy role.
TENANT_SA = "ci-deployer"
PLATFORM_SA = "model-reader"
OWN = {"serviceAccountName": TENANT_SA}
#: The operator's default names one too, so the kinds without a podTemplate of their own
#: (a RecommendationJob's load generator) are covered.
SETTINGS = {
    "plain": OperatorSettings(s3_secret_name="s3-creds"),
    "default-sa": OperatorSettings(s3_secret_name="s3-creds", default_pod_template={
        "serviceAccountName": PLATFORM_SA, "imagePullSecrets": [{"name": "regcred"}]}),
}


def _examples(kind: str) -> list[dict[str, Any]]:
    docs = [yaml.safe_load(p.read_text()) for p in sorted((REPO / "examples").glob("*.yaml"))
            if f"kind: {kind}" in p.read_text()]
    assert docs, kind
    return docs


def _with_own(holder: dict[str, Any]) -> None:
    holder["podTemplate"] = {**(holder.get("podTemplate") or {}), **OWN}


def _endpoints(settings: OperatorSettings) -> Iterator[dict[str, Any]]:
    compiled = {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint",
                "metadata": {"name": "compiled"}, "spec": {"variants": [
                    {"name": "primary", "model": {"uri": "s3://m/iris.onnx",
                                                  "compile": {"target": "native"}}}]}}
    for doc in [*_examples("Endpoint"), compiled]:
        doc = copy.deepcopy(doc)
        for variant in doc["spec"]["variants"] + doc["spec"].get("shadowVariants", []):
            _with_own(variant)
        _with_own(doc["spec"].setdefault("gateway", {}))
        plan = plan_endpoint(Endpoint.model_validate(doc), generation=1)
        owner = Owner(doc["metadata"]["name"], "ml", UID)
        yield from render_endpoint(plan, owner, settings, [v.name for v in plan.variants])


def _transform_jobs(settings: OperatorSettings) -> Iterator[dict[str, Any]]:
    sidecar = {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "TransformJob",
               "metadata": {"name": "sidecar", "namespace": "ml"},
               "spec": {"containers": [{"name": "m", "image": "example.test/m:1"}],
                        "input": {"uri": "s3://data/in/"}, "output": {"uri": "s3://data/out/"},
                        "resources": {"instanceCount": 4, "requests": {"cpu": "1"}}}}
    for doc in [*_examples("TransformJob"), sidecar]:
        doc = copy.deepcopy(doc)
        _with_own(doc["spec"])
        job = TransformJob.model_validate(doc)
        model = own_model(job.spec)
        assert model is not None
        plan = plan_transform(job, model)
        for step in Step:
            yield render_transform_job(plan, step, namespace="ml", uid=UID, settings=settings,
                                       shards=3)


def _compilation_jobs(settings: OperatorSettings) -> Iterator[dict[str, Any]]:
    for doc in _examples("CompilationJob"):
        doc = copy.deepcopy(doc)
        doc["spec"]["model"]["uri"] = "s3://models/mlp.onnx"
        doc["spec"]["output"]["uri"] = "s3://compiled/mlp/"
        for resources in (None, {"requests": {"cpu": "1"}}):
            if resources:
                doc["spec"]["resources"] = resources
            _with_own(doc["spec"])
            yield compile_jobs.render_job(plan_compile(CompilationJob.model_validate(doc)),
                                          namespace="ml", uid=UID, settings=settings)


def _recommendation_jobs(settings: OperatorSettings) -> Iterator[dict[str, Any]]:
    endpoint: dict[str, Any] = {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint",
                                "metadata": {"name": "shop", "namespace": "ml"},
                                "spec": {"variants": [{"name": "a",
                                                       "model": {"uri": "s3://m/a.onnx"},
                                                       "podTemplate": OWN}]}}
    by_ref: dict[str, Any] = {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "RecommendationJob",
                              "metadata": {"name": "shop", "namespace": "ml"},
                              "spec": {"endpointRef": {"name": "shop"},
                                       "candidates": [{"name": "t1"},
                                                      {"name": "t2", "threads": 2}]}}
    cases: list[tuple[dict[str, Any], dict[str, Any] | None]] = [
        (d, None) for d in _examples("RecommendationJob")]
    for doc, source in [*cases, (by_ref, endpoint)]:
        doc = copy.deepcopy(doc)
        if doc["spec"].get("model"):
            doc["spec"]["model"]["uri"] = "s3://models/mlp.onnx"
        plan = recommend_jobs.plan_recommend(RecommendationJob.model_validate(doc), "ml",
                                             source)
        yield recommend_jobs.render_job(plan, uid=UID, settings=settings)
        for i in range(len(plan.candidates)):
            yield from recommend_jobs.render_candidate(plan, i, uid=UID, settings=settings)


def _edge_fleets(settings: OperatorSettings) -> Iterator[dict[str, Any]]:
    doc = {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "EdgeFleet",
           "metadata": {"name": "sensors", "namespace": "ml"},
           "spec": {"model": {"uri": "s3://models/mlp.onnx"},
                    "targets": [{"name": "x86"},
                                {"name": "arm", "compile": {"target": "aarch64"}}],
                    "registration": {"bootstrapTokenSecret": {"name": "boot", "key": "token"}},
                    "signing": {"keySecret": {"name": "signing", "key": "key"}},
                    "packages": {"uri": "s3://pkgs/edge"},
                    "redis": {"url": "redis://redis:6379/0"},
                    "server": {"podTemplate": OWN}}}
    plan = plan_fleet(EdgeFleet.model_validate(doc), "ml")
    version = VersionStatus(version=plan.version, model=plan.model_uri, publicKey="A" * 43 + "=",
                            packages=[PackageStatus(target=t, uri=f"s3://pkgs/edge/{t}.tar.gz",
                                                    sha256="ab" * 32, size=10, signature="c2ln")
                                      for t in plan.targets])
    for build in plan.builds:
        yield fleet_render.package_job(plan, build, uid=UID, settings=settings)
    yield from fleet_render.fleet_server_objects(plan, fleet_config(plan, version, None),
                                                 uid=UID, settings=settings)


KINDS = {"Endpoint": _endpoints, "TransformJob": _transform_jobs,
         "CompilationJob": _compilation_jobs, "RecommendationJob": _recommendation_jobs,
         "EdgeFleet": _edge_fleets}


@pytest.mark.parametrize("settings_id", list(SETTINGS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_no_rendered_pod_mounts_an_api_token_and_every_container_is_bounded(
        kind: str, settings_id: str) -> None:
    pods = 0
    for manifest in KINDS[kind](SETTINGS[settings_id]):
        if manifest["kind"] not in ("Deployment", "Job"):
            continue
        pods += 1
        where = f"{manifest['kind']} {manifest['metadata']['name']}"
        pod = manifest["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False, where
        # The chosen identity is still there (cloud workload identity needs it).
        assert pod.get("serviceAccountName") in (TENANT_SA, PLATFORM_SA, None), where
        for container in pod["containers"] + pod.get("initContainers", []):
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), (where, container["name"])
            assert "memory" in resources["limits"], (where, container["name"])
        kubernetes_validate.validate(manifest, "1.33.0", strict=True)
    assert pods


def test_a_tenants_service_account_is_named_but_its_token_stays_out() -> None:
    """The audit's case: ``serviceAccountName: ci-deployer`` on a variant."""
    named = [m["spec"]["template"]["spec"] for m in _endpoints(SETTINGS["plain"])
             if m["kind"] == "Deployment"]
    assert named and all(p["serviceAccountName"] == TENANT_SA for p in named)
    assert all(p["automountServiceAccountToken"] is False for p in named)
