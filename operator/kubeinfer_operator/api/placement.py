"""Placement and identity of runtime pods: the ``podTemplate`` block (and its merge). PURE.

An Endpoint's gateway (``spec.gateway.podTemplate``), each of its variants
(``spec.variants[*].podTemplate``) and a TransformJob's pods
(``spec.podTemplate``) take the same block: where the pods may run
(nodeSelector, tolerations, affinity, topologySpreadConstraints), how they rank
(priorityClassName), who they run as (serviceAccountName, imagePullSecrets)
and extra pod labels and annotations. The operator-wide default (the chart's
``runtime.podTemplate``, env ``KUBEINFER_DEFAULT_POD_TEMPLATE``) sits under it:
``merge_pod_templates`` gives the object's own value per field, and the union
of both for the three maps, key by key (the object's value wins).

Kubernetes-shaped sub-objects (a toleration, an affinity, a spread constraint)
stay free-form here, and in the CRD (``x-kubernetes-preserve-unknown-fields``):
their schemas are large and the API server checks the rendered pod anyway.
What is cheap to check is checked when the object is read: label and
annotation syntax, DNS names, the enums of a toleration and a spread
constraint, and the labels the operator selects pods by, which a template may
never set (``app.kubernetes.io/*`` and ``kubeinfer.io/*``).

Whoever may create a kubeinfer object may write its podTemplate, so a template
must not buy more than a pod of the namespace's own would get from the cluster's
admission policy. Refused (``toleration_problem``, ``priority_problem``,
``escalating_key_problem``: a short deny-list):

* a toleration without ``key`` (it tolerates every taint: control-plane,
  cordoned and dedicated nodes alike) or of the control plane's taints;
* the ``system-`` PriorityClasses (``system-node-critical``,
  ``system-cluster-critical``): Kubernetes' own, above every workload, evicted
  last under node pressure;
* labels and annotations that loosen the pods' confinement or leave the service
  mesh: AppArmor and seccomp profile annotations (the pods run under the
  runtime's default profiles; ``unconfined`` would lift them) and any
  key under ``istio.io`` or ``linkerd.io`` (sidecar injection, traffic capture
  exclusions, proxy config: an opt-out of mTLS and egress policy).

``serviceAccountName`` stays the user's choice (cloud workload identity: IRSA,
EKS Pod Identity, GKE and Azure Workload Identity); the renderers never mount
its Kubernetes API token (``render.k8s_placement``). The operator's own default
(the chart's ``runtime.podTemplate``) is the cluster administrator's and is
checked for syntax only (``validated(..., trusted=True)``).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

#: Label (and annotation) keys the operator's selectors and hashes use: never the user's.
RESERVED_PREFIXES = ("app.kubernetes.io/", "kubeinfer.io/")

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_NAME_PART = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
#: The fields of a ``podTemplate``, by their YAML names.
FIELDS = ("nodeSelector", "tolerations", "affinity", "topologySpreadConstraints",
          "priorityClassName", "serviceAccountName", "imagePullSecrets", "labels",
          "annotations")
#: The fields merged key by key (the others: the object's own value replaces the default).
MAP_FIELDS = ("nodeSelector", "labels", "annotations")

_FREE_FORM: dict[str, Any] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
#: Most tolerations, labels and annotations of one podTemplate: bounds what the CRD's CEL
#: rules over them may cost (the API server refuses a CRD whose rules' cost it cannot bound).
MAX_TEMPLATE_ITEMS = 128
#: Most bytes of a podTemplate's annotations (keys and values, UTF-8): the API server's 256
#: KiB for all of a pod's, less 4 KiB for the operator's own.
MAX_ANNOTATIONS = 256 * 1024 - 4 * 1024
#: Longest label or annotation key: a DNS subdomain prefix (253), '/', a name (63).
MAX_KEY = 253 + 1 + 63
#: A toleration stays free-form, but for its ``key``: declared so the CRD's CEL rules can
#: read it (CEL sees no undeclared field of a free-form object).
_TOLERATION: dict[str, Any] = {
    **_FREE_FORM,
    "properties": {"key": {"type": "string", "maxLength": MAX_KEY,
                           "description": "The taint's key; required here (a toleration "
                                          "without one matches every taint)."}},
}

#: Taints a podTemplate may not tolerate: the control plane's nodes run the cluster.
CONTROL_PLANE_TAINTS = ("node-role.kubernetes.io/control-plane", "node-role.kubernetes.io/master")
#: PriorityClasses Kubernetes keeps for the cluster's own critical pods.
SYSTEM_PRIORITY_PREFIX = "system-"
#: Annotation keys that set the pods' AppArmor or seccomp profile, over what the operator
#: renders (seccomp RuntimeDefault) or leaves to the runtime (its default AppArmor
#: profile): ``unconfined`` would lift either.
CONFINEMENT_PREFIXES = ("container.apparmor.security.beta.kubernetes.io/",
                        "seccomp.security.alpha.kubernetes.io/",
                        "container.seccomp.security.alpha.kubernetes.io/")
#: Service meshes whose label and annotation keys (under the domain or a subdomain of it)
#: configure the pods' proxy: injection, traffic capture, exclusions, proxy config.
MESH_DOMAINS = ("istio.io", "linkerd.io")
#: ``model_validate`` context of the operator's own default template (the administrator's).
_TRUSTED = "trusted"


def _free_form(schema: dict[str, Any]) -> None:
    """A Kubernetes-shaped object kept as is: no ``additionalProperties`` beside
    ``x-kubernetes-preserve-unknown-fields`` (a structural schema allows one of them)."""
    schema.pop("additionalProperties", None)
    schema.update(_FREE_FORM)


def dns_subdomain_problem(value: str) -> str | None:
    if len(value) > 253 or not _DNS_SUBDOMAIN.match(value):
        return (f"{value!r} is not a DNS subdomain name: lower-case letters, digits, '-' and "
                "'.', starting and ending with a letter or digit, at most 253 characters")
    return None


def key_problem(key: str) -> str | None:
    """Why ``key`` is not a valid label or annotation key (``[prefix/]name``), or None."""
    prefix, _, name = key.rpartition("/")
    if "/" in key and not prefix:
        return f"key {key!r} has an empty prefix before '/'"
    if prefix and dns_subdomain_problem(prefix):
        return f"key {key!r}: prefix {prefix!r} must be a DNS subdomain (example.com)"
    if not name or len(name) > 63 or not _NAME_PART.match(name):
        return (f"key {key!r}: name {name!r} must be 1 to 63 characters of letters, digits, "
                "'-', '_' and '.', starting and ending with a letter or digit")
    return None


def label_value_problem(key: str, value: str) -> str | None:
    if len(value) > 63 or not _LABEL_VALUE.match(value):
        return (f"value {value!r} of {key!r} must be at most 63 characters of letters, digits, "
                "'-', '_' and '.', starting and ending with a letter or digit")
    return None


def reserved_key_problem(key: str, what: str) -> str | None:
    if key.startswith(RESERVED_PREFIXES):
        return (f"{what} {key!r} is reserved: the operator selects and tracks its pods with "
                f"the {' and '.join(p + '*' for p in RESERVED_PREFIXES)} keys; use another "
                "key (example.com/team)")
    return None


#: Pod labels Kubernetes' controllers set themselves: the Job controller's (the API server
#: refuses a Job whose template sets one: its generated selector no longer matches) and
#: the Deployment controller's pod-template-hash (silently replaced on every pod).
CONTROLLER_LABELS = ("job-name", "controller-uid", "pod-template-hash")
CONTROLLER_LABEL_PREFIXES = ("batch.kubernetes.io/",)


def controller_label_problem(key: str) -> str | None:
    if key in CONTROLLER_LABELS or key.startswith(CONTROLLER_LABEL_PREFIXES):
        return (f"label {key!r} is set by Kubernetes' Job and Deployment controllers on the "
                "pods they create (a Job whose template sets it is refused); use another key")
    return None


def escalating_key_problem(key: str, what: str) -> str | None:
    """Why a podTemplate may not set label or annotation ``key`` (the deny-list), or None."""
    if key.startswith(CONFINEMENT_PREFIXES):
        return (f"{what} {key!r} is refused: it would set the pods' AppArmor or seccomp "
                "profile (the operator runs them under the runtime's default profiles); "
                "remove it")
    prefix = key.rpartition("/")[0]
    if any(prefix == d or prefix.endswith("." + d) for d in MESH_DOMAINS):
        return (f"{what} {key!r} is refused: keys under {' and '.join(MESH_DOMAINS)} "
                "configure the service mesh's proxy (injection, traffic capture), which the "
                "cluster administrator decides (the chart's runtime.podTemplate); remove it")
    return None


def _trusted(info: ValidationInfo) -> bool:
    return isinstance(info.context, dict) and bool(info.context.get(_TRUSTED))


def _check_map(values: dict[str, str], what: str, *, label_values: bool,
               reserved: bool, deny_list: bool = False) -> dict[str, str]:
    problems: list[str] = []
    for key, value in values.items():
        problems += [p for p in (key_problem(key),
                                 reserved_key_problem(key, what) if reserved else None,
                                 escalating_key_problem(key, what) if deny_list else None,
                                 label_value_problem(key, value) if label_values else None)
                     if p]
    if problems:
        raise ValueError("; ".join(problems))
    return values


def toleration_problem(i: int, toleration: dict[str, Any]) -> str | None:
    """Why a podTemplate may not carry ``toleration`` (the deny-list), or None."""
    key = toleration.get("key")
    if not key:
        return (f"tolerations[{i}] has no key: a toleration without one matches every taint "
                "(control-plane, cordoned and dedicated nodes alike); name the taint's key "
                "(key: dedicated)")
    if key in CONTROL_PLANE_TAINTS:
        return (f"tolerations[{i}].key {key!r} is refused: runtime pods do not run on "
                "control-plane nodes; remove the toleration")
    return None


def priority_problem(name: str) -> str | None:
    if name.startswith(SYSTEM_PRIORITY_PREFIX):
        return (f"priorityClassName {name!r} is refused: the {SYSTEM_PRIORITY_PREFIX}* "
                "classes are Kubernetes' own, for the cluster's critical pods (they preempt "
                "any workload); use another PriorityClass of the cluster")
    return None


def _toleration_shape_problem(i: int, t: dict[str, Any], op: str) -> str | None:
    """What the API server (``ValidateTolerations``) refuses in a toleration the checks above
    let through: a value that is not a label value, a key that is not a string, a
    ``tolerationSeconds`` that is not an integer or comes without ``effect: NoExecute``."""
    where = f"tolerations[{i}]"
    key, value = t.get("key"), t.get("value", "")
    if key is not None and not isinstance(key, str):
        return f"{where}.key must be a string"
    if not isinstance(value, str):
        return f"{where}.value must be a string (quote it)"
    if op == "Equal" and label_value_problem("value", value):
        return (f"{where}.value {value[:64]!r} must be a label value: at most 63 characters "
                "of letters, digits, '-', '_' and '.', starting and ending with a letter or "
                "digit")
    if not key and op != "Exists":
        return f"{where}: a toleration without key needs operator Exists"
    seconds = t.get("tolerationSeconds")
    if seconds is not None:
        if not isinstance(seconds, int) or isinstance(seconds, bool):
            return f"{where}.tolerationSeconds must be an integer"
        if t.get("effect") != "NoExecute":
            return (f"{where}.tolerationSeconds applies to effect NoExecute only; set "
                    "effect: NoExecute or remove tolerationSeconds")
    return None


def _spread_problem(where: str, c: dict[str, Any]) -> str | None:
    """What the API server (``ValidateTopologySpreadConstraints``) refuses in a spread
    constraint the checks above let through."""
    problem = key_problem(c["topologyKey"])
    if problem:
        return f"{where}.topologyKey: {problem}"
    if "minDomains" in c:
        domains = c["minDomains"]
        if not isinstance(domains, int) or isinstance(domains, bool) or domains < 1:
            return f"{where}.minDomains must be an integer of at least 1"
        if c["whenUnsatisfiable"] != "DoNotSchedule":
            return f"{where}.minDomains applies to whenUnsatisfiable DoNotSchedule only"
    for policy in ("nodeAffinityPolicy", "nodeTaintsPolicy"):
        if policy in c and c[policy] not in _NODE_POLICIES:
            return f"{where}.{policy} must be Honor or Ignore"
    keys = c.get("matchLabelKeys", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        return f"{where}.matchLabelKeys must be a list of label keys"
    for key in keys:
        problem = key_problem(key) or reserved_key_problem(key, "matchLabelKeys key")
        if problem:
            return f"{where}.matchLabelKeys: {problem}"
    return None


class LocalObjectReference(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: Annotated[str, Field(description="Name of a Secret in the object's namespace.",
                               min_length=1, max_length=253)]

    @field_validator("name")
    @classmethod
    def _dns(cls, name: str) -> str:
        problem = dns_subdomain_problem(name)
        if problem:
            raise ValueError(problem)
        return name


_TOLERATION_OPERATORS = ("Exists", "Equal")
_TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
_UNSATISFIABLE = ("DoNotSchedule", "ScheduleAnyway")
_NODE_POLICIES = ("Honor", "Ignore")


class PodTemplate(BaseModel):
    """Placement and identity of runtime pods (a subset of a Kubernetes pod template)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    nodeSelector: Annotated[
        dict[str, str],
        Field(description="Node labels the pods' nodes must have (pod spec nodeSelector), "
                          "e.g. {kubernetes.io/arch: amd64}; merged key by key with the "
                          "operator's default."),
    ] = Field(default_factory=dict)
    tolerations: Annotated[
        list[dict[str, Any]],
        Field(description="Taints the pods tolerate (Kubernetes Toleration objects: key, "
                          "operator Exists/Equal, value, effect, tolerationSeconds); replaces "
                          "the operator's default list. Each names its taint's key; the "
                          "control plane's taints are refused. At most 128.",
              max_length=MAX_TEMPLATE_ITEMS, json_schema_extra={"items": _TOLERATION}),
    ] = Field(default_factory=list)
    affinity: Annotated[
        dict[str, Any],
        Field(description="Node, pod and pod anti-affinity (a Kubernetes Affinity object); "
                          "replaces the operator's default.",
              json_schema_extra=_free_form),
    ] = Field(default_factory=dict)
    topologySpreadConstraints: Annotated[
        list[dict[str, Any]],
        Field(description="How replicas spread over zones or nodes (Kubernetes "
                          "TopologySpreadConstraint objects). A constraint without "
                          "labelSelector selects the pods of its own Deployment.",
              json_schema_extra={"items": _FREE_FORM}),
    ] = Field(default_factory=list)
    priorityClassName: Annotated[
        str | None,
        Field(description="PriorityClass of the pods (scheduling order and preemption). "
                          "Kubernetes' own system-* classes are refused.",
              max_length=253),
    ] = None
    serviceAccountName: Annotated[
        str | None,
        Field(description="ServiceAccount the pods run as, for its cloud workload "
                          "identity (IRSA, EKS Pod Identity, GKE Workload Identity). The "
                          "pods never mount its Kubernetes API token "
                          "(automountServiceAccountToken: false).",
              max_length=253),
    ] = None
    imagePullSecrets: Annotated[
        list[LocalObjectReference],
        Field(description="Secrets holding registry credentials for the pods' images, as "
                          "[{name: regcred}].", max_length=32),
    ] = Field(default_factory=list)
    labels: Annotated[
        dict[str, str],
        Field(description="Extra pod labels (at most 128). Keys under app.kubernetes.io/ "
                          "and kubeinfer.io/ are the operator's and refused, and so are "
                          "service-mesh keys (istio.io, linkerd.io and their subdomains).",
              max_length=MAX_TEMPLATE_ITEMS),
    ] = Field(default_factory=dict)
    annotations: Annotated[
        dict[str, str],
        Field(description="Extra pod annotations (at most 128; e.g. for a log shipper). "
                          "Keys under app.kubernetes.io/ and kubeinfer.io/ are the operator's "
                          "and refused, and so are AppArmor and seccomp profile annotations "
                          "and service-mesh keys (istio.io, linkerd.io and their subdomains).",
              max_length=MAX_TEMPLATE_ITEMS),
    ] = Field(default_factory=dict)

    @field_validator("nodeSelector")
    @classmethod
    def _node_selector(cls, values: dict[str, str]) -> dict[str, str]:
        return _check_map(values, "nodeSelector key", label_values=True, reserved=False)

    @field_validator("labels")
    @classmethod
    def _labels(cls, values: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        problems = [p for key in values if (p := controller_label_problem(key))]
        if problems:
            raise ValueError("; ".join(problems))
        return _check_map(values, "label", label_values=True, reserved=True,
                          deny_list=not _trusted(info))

    @field_validator("annotations")
    @classmethod
    def _annotations(cls, values: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        # The API server counts bytes (UTF-8), not characters, and adds the operator's own
        # pod annotations (hashes, well under the margin left here).
        if sum(len(k.encode()) + len(v.encode()) for k, v in values.items()) > MAX_ANNOTATIONS:
            raise ValueError(f"annotations total more than {MAX_ANNOTATIONS} bytes (UTF-8): "
                             "the API server refuses pods whose annotations pass 256 KiB; "
                             "shorten them")
        return _check_map(values, "annotation", label_values=False, reserved=True,
                          deny_list=not _trusted(info))

    @field_validator("priorityClassName", "serviceAccountName")
    @classmethod
    def _names(cls, name: str | None) -> str | None:
        problem = dns_subdomain_problem(name) if name is not None else None
        if problem:
            raise ValueError(problem)
        return name

    @field_validator("priorityClassName")
    @classmethod
    def _priority(cls, name: str | None, info: ValidationInfo) -> str | None:
        problem = None if name is None or _trusted(info) else priority_problem(name)
        if problem:
            raise ValueError(problem)
        return name

    @field_validator("tolerations")
    @classmethod
    def _tolerations(cls, items: list[dict[str, Any]],
                     info: ValidationInfo) -> list[dict[str, Any]]:
        for i, t in enumerate(items):
            op = t.get("operator", "Equal")
            if op not in _TOLERATION_OPERATORS:
                raise ValueError(f"tolerations[{i}].operator {op!r} must be Exists or Equal")
            effect = t.get("effect")
            if effect not in (None, "", *_TAINT_EFFECTS):
                raise ValueError(f"tolerations[{i}].effect {effect!r} must be one of "
                                 f"{', '.join(_TAINT_EFFECTS)} (or empty: all effects)")
            if op == "Exists" and t.get("value"):
                raise ValueError(f"tolerations[{i}]: operator Exists takes no value; remove "
                                 "value or use operator Equal")
            key = t.get("key")
            if key and key_problem(str(key)):
                raise ValueError(f"tolerations[{i}].{key_problem(str(key))}")
            problem = (None if _trusted(info) else toleration_problem(i, t)) or \
                _toleration_shape_problem(i, t, op)
            if problem:
                raise ValueError(problem)
        return items

    @field_validator("topologySpreadConstraints")
    @classmethod
    def _spread(cls, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, c in enumerate(items):
            where = f"topologySpreadConstraints[{i}]"
            skew = c.get("maxSkew")
            if not isinstance(skew, int) or isinstance(skew, bool) or skew < 1:
                raise ValueError(f"{where}.maxSkew must be an integer of at least 1")
            if not isinstance(c.get("topologyKey"), str) or not c["topologyKey"]:
                raise ValueError(f"{where}.topologyKey is required, e.g. "
                                 "topology.kubernetes.io/zone")
            if c.get("whenUnsatisfiable") not in _UNSATISFIABLE:
                raise ValueError(f"{where}.whenUnsatisfiable must be DoNotSchedule or "
                                 "ScheduleAnyway")
            problem = _spread_problem(where, c)
            if problem:
                raise ValueError(problem)
        pairs = [(c["topologyKey"], c["whenUnsatisfiable"]) for c in items]
        for i, pair in enumerate(pairs):
            if pair in pairs[:i]:
                raise ValueError(f"topologySpreadConstraints[{i}] repeats topologyKey "
                                 f"{pair[0]!r} with whenUnsatisfiable {pair[1]}; merge the two")
        return items

    def written(self) -> dict[str, Any]:
        """The fields the object sets, as written (YAML names): what the merge layers."""
        out: dict[str, Any] = self.model_dump(mode="json", by_alias=True, exclude_unset=True,
                                              exclude_none=True)
        return out


class GatewaySettings(BaseModel):
    """The Endpoint's gateway pods."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    podTemplate: Annotated[
        PodTemplate | None,
        Field(description="Placement and identity of the gateway pods (Kubernetes only), "
                          "over the operator's default podTemplate."),
    ] = None


def merge_pod_templates(default: dict[str, Any] | None,
                        own: dict[str, Any] | None) -> dict[str, Any]:
    """``own`` over ``default``, field by field; the three maps merged key by key.

    Both are ``podTemplate`` dicts as written (``PodTemplate.written``): a field
    absent from ``own`` takes the default's value, one present replaces it (an
    empty ``tolerations: []`` clears the default's), and nodeSelector, labels
    and annotations hold the keys of both, ``own``'s value winning.
    """
    default = default or {}
    own = own or {}
    out: dict[str, Any] = {}
    for name in FIELDS:
        if name in MAP_FIELDS:
            merged = {**(default.get(name) or {}), **(own.get(name) or {})}
            if merged:
                out[name] = merged
        elif name in own:
            out[name] = own[name]
        elif name in default:
            out[name] = default[name]
    return out


def validated(template: dict[str, Any] | None, where: str, *,
              trusted: bool = False) -> dict[str, Any]:
    """``template`` checked as a ``PodTemplate`` and returned as written (ValueError names
    ``where``, e.g. the setting it came from). ``trusted``: the cluster administrator's
    (the operator's default), checked for syntax but not against the deny-list."""
    if not template:
        return {}
    try:
        return PodTemplate.model_validate(template, context={_TRUSTED: trusted}).written()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: "
            f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
        raise ValueError(f"{where}: {problems}") from None


#: ``spec.podTemplate`` of the job kinds (TransformJob, CompilationJob): one field type,
#: so their schemas and descriptions cannot drift apart.
JobPodTemplate = Annotated[
    PodTemplate | None,
    Field(description="Placement and identity of the job's pods (Kubernetes only): "
                      "nodeSelector, tolerations, affinity, topologySpreadConstraints, "
                      "priorityClassName, serviceAccountName, imagePullSecrets, labels, "
                      "annotations; over the operator's default podTemplate, field by "
                      "field."),
]
