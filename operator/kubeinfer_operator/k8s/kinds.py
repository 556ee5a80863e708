"""The API resources the operator reads and writes, and their URL paths: PURE."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

from kubeinfer_operator.api import compilation_job as cj
from kubeinfer_operator.api import edge_fleet as ef
from kubeinfer_operator.api import endpoint as ep
from kubeinfer_operator.api import recommendation_job as rj
from kubeinfer_operator.api import transform_job as tj


@dataclass(frozen=True)
class Kind:
    api_version: str
    kind: str
    plural: str

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    def path(self, namespace: str, name: str | None = None,
             subresource: str | None = None) -> str:
        """``/api/v1/namespaces/ns/configmaps/name`` or ``/apis/apps/v1/...``."""
        root = f"/apis/{self.api_version}" if self.group else f"/api/{self.api_version}"
        out = f"{root}/namespaces/{quote(namespace, safe='')}/{self.plural}"
        if name is not None:
            out += f"/{quote(name, safe='')}"
            if subresource:
                out += f"/{subresource}"
        return out


DEPLOYMENT = Kind("apps/v1", "Deployment", "deployments")
SERVICE = Kind("v1", "Service", "services")
CONFIGMAP = Kind("v1", "ConfigMap", "configmaps")
#: Variants scaled on CPUUtilization alone (render.k8s_autoscaling).
HPA = Kind("autoscaling/v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers")
NETWORK_POLICY = Kind("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies")
#: Gateways and variants of two replicas or more (render.k8s_disruption).
PDB = Kind("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets")
#: The per-namespace runtime Secret (render.k8s_secrets); not a labelled child.
SECRET = Kind("v1", "Secret", "secrets")
ENDPOINT = Kind(ep.API_VERSION, ep.KIND, ep.PLURAL)
#: Events the scaler posts on Endpoints (reason Scaled).
EVENT = Kind("v1", "Event", "events")
TRANSFORM_JOB = Kind(tj.API_VERSION, tj.KIND, tj.PLURAL)
COMPILATION_JOB = Kind(cj.API_VERSION, cj.KIND, cj.PLURAL)
RECOMMENDATION_JOB = Kind(rj.API_VERSION, rj.KIND, rj.PLURAL)
#: Edge fleets (render.edge_fleet): package Jobs, the fleet server and its config.
EDGE_FLEET = Kind(ef.API_VERSION, ef.KIND, ef.PLURAL)
#: A TransformJob's planner, workers and finalizer (render.transform_jobs); a
#: CompilationJob's compiler (render.compile_jobs).
JOB = Kind("batch/v1", "Job", "jobs")
#: Read only: the termination messages of a TransformJob's or CompilationJob's pods
#: (their reports).
POD = Kind("v1", "Pod", "pods")

#: Every kind an Endpoint's children can be, in the order they are listed.
CHILD_KINDS = (CONFIGMAP, SERVICE, DEPLOYMENT, HPA, NETWORK_POLICY, PDB)
BY_KIND = {k.kind: k for k in (DEPLOYMENT, SERVICE, CONFIGMAP, HPA, NETWORK_POLICY, PDB, SECRET,
                               ENDPOINT, EVENT, TRANSFORM_JOB, COMPILATION_JOB,
                               RECOMMENDATION_JOB, EDGE_FLEET, JOB, POD)}


def kind_of(manifest: dict[str, object]) -> Kind:
    kind = BY_KIND.get(str(manifest.get("kind")))
    if kind is None or kind.api_version != manifest.get("apiVersion"):
        raise ValueError(f"Unsupported object {manifest.get('apiVersion')}/{manifest.get('kind')}")
    return kind
