"""The Kubernetes objects of one RecommendationJob: PURE.

A RecommendationJob becomes, per candidate ``i``, a Deployment + ClusterIP Service
``<name>-c<i>`` (the source variant's model server, rendered by
``render.k8s_workloads`` with the candidate's resources, threads, workers and
replicas), and one ``batch/v1`` Job ``<name>-recommend`` running
``kubeinfer-runtime recommend`` with the request (candidates with their Service
URLs) in ``KUBEINFER_RECOMMEND_REQUEST``. Its compact report is the container's
termination message. Everything is owned by the RecommendationJob and labelled
``kubeinfer.io/recommendation-job``; the Job carries the spec's hash.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from kubeinfer_operator.api import recommendation_job as rj
from kubeinfer_operator.api.endpoint import Endpoint
from kubeinfer_operator.reconcile.validate import variant_env_problems
from kubeinfer_operator.render import k8s_meta as meta
from kubeinfer_operator.render.compile_jobs import pod_failure_policy
from kubeinfer_operator.render.k8s_placement import apply_pod_template, effective_template
from kubeinfer_operator.render.k8s_workloads import (
    METRICS_PORT_NAME,
    PORT_NAME,
    Owner,
    _container_security,
    _env,
    _pod_security,
    _service,
    _tmp_volume,
    model_server_deployment,
    service_url,
)
from kubeinfer_operator.render.plan import plan_endpoint
from kubeinfer_operator.render.recommend_plan import (
    apply_candidate,
    pick_variant,
    recommend_request,
)
from kubeinfer_operator.render.transform_names import ANNOTATION_RUN_HASH
from kubeinfer_operator.settings import OperatorSettings
from kubeinfer_runtime.contract.recommend import (
    EXIT_BAD_INPUT,
    EXIT_NO_RECOMMENDATION,
    Candidate,
    RecommendRequest,
)

#: kubeinfer's label on every object of a RecommendationJob (to list and watch them).
LABEL_RECOMMENDATION_JOB = "kubeinfer.io/recommendation-job"
#: The candidate's name, on its Deployment and Service.
LABEL_CANDIDATE = "kubeinfer.io/recommendation-candidate"
CONTAINER = "recommend"
COMPONENT = "recommender"
#: The env var the runtime reads the request from (its ``recommend.main.ENV_REQUEST``).
ENV_REQUEST = "KUBEINFER_RECOMMEND_REQUEST"
TERMINATION_LOG = "/dev/termination-log"
#: The model name the recommender asks a candidate's metadata under (``GET
#: /v2/models/model``, to make a payload from the signature): the runtime's
#: ``recommend.servers.MODEL_NAME``. A candidate's variant is named so.
CANDIDATE_MODEL_NAME = "model"


def job_name(name: str) -> str:
    return f"{name}-recommend"


def candidate_object_name(name: str, index: int) -> str:
    return f"{name}-c{index}"


def selector(name: str) -> dict[str, str]:
    """Labels every object of one RecommendationJob carries."""
    return {LABEL_RECOMMENDATION_JOB: name, meta.LABEL_MANAGED_BY: meta.MANAGED_BY}


def labels(name: str) -> dict[str, str]:
    return {meta.LABEL_NAME: meta.APP_NAME, meta.LABEL_INSTANCE: name,
            meta.LABEL_COMPONENT: COMPONENT, meta.LABEL_PART_OF: meta.APP_NAME,
            **selector(name)}


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    return {**meta.owner_reference(name, uid), "apiVersion": rj.API_VERSION, "kind": rj.KIND}


class RecommendSpecError(ValueError):
    """The source Endpoint or the search cannot be recommended for (message: the fix)."""


@dataclass(frozen=True)
class RecommendPlan:
    """Everything the operator needs to run one RecommendationJob."""

    name: str
    namespace: str
    #: The source Endpoint document, reduced to the one variant (``variant``) measured.
    endpoint: dict[str, Any]
    variant: str
    #: The request without URLs (``request_with_urls`` adds the Services').
    request: RecommendRequest
    model_description: str
    deadline_s: int
    ttl_s: int | None
    run_hash: str

    @property
    def candidates(self) -> list[Candidate]:
        return list(self.request.candidates)


def source_endpoint(job: rj.RecommendationJob,
                    endpoint_doc: dict[str, Any] | None) -> dict[str, Any]:
    """The Endpoint document the candidates derive from: ``endpointRef``'s (read by the
    caller), or one variant ``main`` serving ``spec.model``."""
    if job.spec.model is not None:
        return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint",
                "metadata": {"name": job.name},
                "spec": {"variants": [{"name": "main", "model": job.spec.model.model_dump(
                    mode="json", exclude_none=True)}]}}
    if endpoint_doc is None:
        raise RecommendSpecError("spec.endpointRef: the Endpoint was not read")
    return endpoint_doc


def plan_recommend(job: rj.RecommendationJob, namespace: str,
                   endpoint_doc: dict[str, Any] | None = None) -> RecommendPlan:
    """Plan a RecommendationJob; RecommendSpecError names what cannot run."""
    doc = source_endpoint(job, endpoint_doc)
    ref = job.spec.endpointRef
    try:
        endpoint = Endpoint.model_validate({k: v for k, v in doc.items() if k != "status"})
        variant = pick_variant(endpoint, ref.variant if ref else None)
        request = recommend_request(endpoint, job.spec.search(), variant=variant.name,
                                    compiled_uri=job.spec.compiledModelUri)
    except ValueError as exc:
        where = f"Endpoint {ref.name}: " if ref else ""
        raise RecommendSpecError(f"{where}{exc}") from exc
    # The candidates run the variant's env in model servers: held to the policy the
    # Endpoint's own validation applies (the document is read, not validated, here).
    index = [v.name for v in endpoint.spec.variants].index(variant.name)
    problems = variant_env_problems(f"spec.variants[{index}]", variant, asynchronous=False)
    if problems:
        raise RecommendSpecError(f"Endpoint {ref.name if ref else job.name}: "
                                 + "; ".join(problems))
    variant_doc = next(v for v in doc["spec"]["variants"] if v.get("name") == variant.name)
    reduced = {"apiVersion": doc["apiVersion"], "kind": "Endpoint",
               "metadata": {"name": doc["metadata"]["name"]},
               "spec": {"variants": [copy.deepcopy(variant_doc)]}}
    hashed = {"spec": job.spec.model_dump(mode="json"), "endpoint": reduced}
    return RecommendPlan(
        name=job.name, namespace=namespace, endpoint=reduced, variant=variant.name,
        request=request, model_description=f"model {request.modelUri}",
        deadline_s=job.spec.deadline_s, ttl_s=job.spec.ttlSecondsAfterFinished,
        run_hash=meta.content_hash(hashed))


def _candidate_variant(plan: RecommendPlan, cand: Candidate) -> dict[str, Any]:
    variant: dict[str, Any] = copy.deepcopy(plan.endpoint["spec"]["variants"][0])
    variant["name"] = CANDIDATE_MODEL_NAME
    variant.pop("autoscaling", None)
    apply_candidate(variant, cand, compiled_uri=plan.request.compiledModelUri,
                    autoscaling_target=None)
    return variant


def _own(manifest: dict[str, Any], plan: RecommendPlan, uid: str,
         cand: Candidate) -> dict[str, Any]:
    md: dict[str, Any] = manifest["metadata"]
    md["ownerReferences"] = [owner_reference(plan.name, uid)]
    md["labels"] = {**md["labels"], **selector(plan.name), LABEL_CANDIDATE: cand.name}
    return manifest


def render_candidate(plan: RecommendPlan, index: int, *, uid: str,
                     settings: OperatorSettings) -> list[dict[str, Any]]:
    """Candidate ``index``'s Deployment and Service."""
    cand = plan.candidates[index]
    name = candidate_object_name(plan.name, index)
    doc = {**plan.endpoint, "metadata": {"name": name, "namespace": plan.namespace},
           "spec": {"variants": [_candidate_variant(plan, cand)]}}
    variant = plan_endpoint(Endpoint.model_validate(doc)).variants[0]
    owner = Owner(name=name, namespace=plan.namespace, uid=uid)
    deployment = model_server_deployment(owner, variant, settings)
    deployment["metadata"]["name"] = name
    # The Deployment's selector stays the rendered one; its pods get the job's label too.
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    template_labels.update({**selector(plan.name), LABEL_CANDIDATE: cand.name})
    service = _service(owner, name, meta.COMPONENT_MODEL_SERVER, variant.name, settings)
    return [_own(deployment, plan, uid, cand), _own(service, plan, uid, cand)]


def candidates_policy_name(name: str) -> str:
    return f"{name}-candidates"


def render_candidates_policy(plan: RecommendPlan, *, uid: str,
                             settings: OperatorSettings) -> dict[str, Any] | None:
    """The candidates' NetworkPolicy when the operator renders policies (None otherwise):
    their model servers answer only this job's load generator, as an Endpoint's answer
    only its gateway (``k8s_network``), and their metrics the configured scrapers."""
    if not settings.network_policy:
        return None
    metrics_rule: dict[str, Any] = {"ports": [{"port": METRICS_PORT_NAME, "protocol": "TCP"}]}
    if settings.metrics_from:
        metrics_rule["from"] = list(settings.metrics_from)
    load = {"podSelector": {"matchLabels": {**selector(plan.name),
                                            meta.LABEL_COMPONENT: COMPONENT}}}
    policy: dict[str, Any] = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": candidates_policy_name(plan.name), "namespace": plan.namespace,
                     "labels": labels(plan.name)},
        "spec": {
            "podSelector": {"matchLabels": {**selector(plan.name),
                                            meta.LABEL_COMPONENT: meta.COMPONENT_MODEL_SERVER}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [load], "ports": [{"port": PORT_NAME, "protocol": "TCP"}]},
                        metrics_rule],
        },
    }
    policy["metadata"]["ownerReferences"] = [owner_reference(plan.name, uid)]
    return policy


def candidate_url(plan: RecommendPlan, index: int, settings: OperatorSettings) -> str:
    return service_url(candidate_object_name(plan.name, index), plan.namespace,
                       settings.runtime_port)


def request_with_urls(plan: RecommendPlan, settings: OperatorSettings) -> RecommendRequest:
    return plan.request.model_copy(update={"candidates": [
        c.model_copy(update={"urls": [candidate_url(plan, i, settings)]})
        for i, c in enumerate(plan.candidates)]})


def render_job(plan: RecommendPlan, *, uid: str,
               settings: OperatorSettings) -> dict[str, Any]:
    """The RecommendationJob's load-test Job."""
    tmp_volume, tmp_mount = _tmp_volume()
    request = request_with_urls(plan, settings)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": settings.runtime_image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": ["recommend", "--termination-log", TERMINATION_LOG],
        "env": _env({ENV_REQUEST: request.model_dump_json(exclude_none=True)}),
        "securityContext": _container_security(),
        "volumeMounts": [tmp_mount],
        "terminationMessagePath": TERMINATION_LOG,
        # The summary is the termination message; a crash before it leaves the log tail.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "resources": {"requests": {"cpu": "1", "memory": "256Mi"},
                      "limits": {"memory": "1Gi"}},
    }
    pod_labels = labels(plan.name)
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "restartPolicy": "Never",
        "securityContext": _pod_security(settings),
        "terminationGracePeriodSeconds": 30,
        "containers": [container],
        "volumes": [tmp_volume],
    }
    policy = pod_failure_policy(CONTAINER)
    # Bad input and "no candidate held the SLO" end the job: a retry measures the same.
    # Ascending: the API server refuses exit codes out of order ("must be ordered").
    policy["rules"][0]["onExitCodes"]["values"] = sorted({EXIT_BAD_INPUT,
                                                          EXIT_NO_RECOMMENDATION})
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(plan.name),
            "namespace": plan.namespace,
            "labels": pod_labels,
            "annotations": {ANNOTATION_RUN_HASH: plan.run_hash},
            "ownerReferences": [owner_reference(plan.name, uid)],
        },
        "spec": {
            "completions": 1,
            "parallelism": 1,
            "backoffLimit": 1,
            "activeDeadlineSeconds": plan.deadline_s,
            "podFailurePolicy": policy,
            # The chart's default placement (the load generator has no podTemplate of its
            # own; the candidates take the variant's).
            "template": apply_pod_template({"metadata": {"labels": pod_labels}, "spec": pod},
                                           effective_template(settings.default_pod_template,
                                                              None), pod_labels),
        },
    }
