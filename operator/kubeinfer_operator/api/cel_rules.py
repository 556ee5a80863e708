"""The cross-field rules of the CRDs, as CEL ``x-kubernetes-validations``: PURE data.

The API models check these rules too (pydantic validators in ``api/*.py`` and
``reconcile/*validate.py``), but only after the object is stored: the operator
then reports ``InvalidSpec``. As CEL the API server refuses them at
``kubectl apply`` time, naming the field, so a GitOps sync fails where the
mistake is. The operator's checks stay: clusters without CEL (before 1.25),
the emulator and local mode (``kubeinfer up -f``) rely on them.

Each rule sits on the schema node its operator message names (``at``), or names
the field below it with ``fieldPath``; its message is the operator's, less the
values CEL cannot print, so ``kubectl apply`` and the InvalidSpec condition say
the same thing about the same field. ``tests/unit/test_cel_rules.py`` runs every
rule from the generated CRDs against specs the operator refuses and accepts.

Written to mean the same in Kubernetes' CEL and in cel-python (the tests'
evaluator): an absent optional field is tested with ``has()`` one level at a
time (``has(self.a) && has(self.a.b)``: in Kubernetes ``has(self.a.b)`` is an
error when ``a`` is absent, in cel-python it is false), and a field with a
default is read as ``has(f) ? f : <default>`` although the API server applies
defaults before it runs the rules. Cost: every list a rule sits in or walks has
``maxItems``, every map it walks ``maxProperties`` and every string it compares a
``maxLength`` (or an enum), so the API server's estimate stays far below its
per-rule limit (10 million) and the CRD's (100 million, each rule's cost times
how many nodes it may run on).

Two policies are generated from their Python source rather than restated: the env
policy (``api.env_policy``: its sets and ``refusal``'s messages, over the names the
operator renders into each kind of container) and the podTemplate deny-list and
reserved keys (``api.placement``). What CEL cannot see stays the operator's: a
TransformJob's ``environment`` where the Endpoint its ``endpointRef`` names decides
which container it reaches (and the env it copies from that Endpoint), and the
podTemplate syntax checks (see ``pod_template_rules``).
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from kubeinfer_operator.api import async_config as ac
from kubeinfer_operator.api import data_capture as dc
from kubeinfer_operator.api import endpoint as ep
from kubeinfer_operator.api import env_policy as envp
from kubeinfer_operator.api import placement as pl
from kubeinfer_operator.api import transform_job as tj
from kubeinfer_operator.api.compile_options import CROSS_TARGETS

#: Operator limits and names the rules repeat (``api`` cannot import ``reconcile`` or
#: ``render``; tests/unit/test_cel_rules.py checks each against its source).
MAX_RESOURCE_NAME = 40  # reconcile.validate.MAX_ENDPOINT_NAME, reconcile.job_validate.MAX_NAME
MAX_OBJECT_NAME = 63  # render.k8s_meta.MAX_NAME: <endpoint>-<variant> is a DNS label
RESERVED_VARIANT_NAMES = ("gateway", "gateway-pods")  # render.k8s_meta.RESERVED_VARIANT_NAMES
#: reconcile.rollout.GREEN_SUFFIX: under a deploymentConfig, variant ``v`` also runs as the
#: fleet ``v-green``, whose Service ``<endpoint>-<v>-green`` must be a DNS label too.
GREEN_SUFFIX = "-green"
NAME_PATTERN = "^[a-z]([-a-z0-9]*[a-z0-9])?$"  # reconcile.validate._ENDPOINT_NAME

#: What the operator renders into each container whose env a spec extends, which that env
#: may not set (``api.env_policy``); the rest of the policy (``env_policy``'s own sets) is
#: imported, not repeated. Each is the operator's set, copied (see above).
#: A model server's: ``reconcile.validate.variant_operator_env(False)``.
SERVER_OPERATOR_ENV = frozenset({
    "KUBEINFER_CACHE_BYTES", "KUBEINFER_DISK_CACHE_BYTES", "KUBEINFER_ENDPOINT_NAME",
    "KUBEINFER_EXIT_ON_LOAD_FAILURE", "KUBEINFER_HOST", "KUBEINFER_METRICS_PORT",
    "KUBEINFER_MODEL_CACHE_DIR",
    "KUBEINFER_MODEL_FORMAT", "KUBEINFER_MODEL_NAME", "KUBEINFER_MODEL_URI",
    "KUBEINFER_MULTI_MODEL_PREFIX", "KUBEINFER_PIPELINE", "KUBEINFER_PORT",
    "KUBEINFER_VARIANT_NAME",
})
#: What an Async endpoint's worker adds: ``variant_operator_env(True)`` less the above.
ASYNC_WORKER_OPERATOR_ENV = frozenset({
    "KUBEINFER_DRAIN_TIMEOUT_S", "KUBEINFER_ERROR_URL", "KUBEINFER_FAILURE_PATH",
    "KUBEINFER_FORMER_PATHS", "KUBEINFER_INPUT_PATHS", "KUBEINFER_INVOCATION_TIMEOUT_S",
    "KUBEINFER_MAX_CONCURRENCY",
    "KUBEINFER_MAX_INPUT_BYTES", "KUBEINFER_MAX_PAYLOAD_BYTES", "KUBEINFER_MAX_RETRIES",
    "KUBEINFER_OUTBOUND_ALLOW", "KUBEINFER_OUTPUT_PATH", "KUBEINFER_QUEUE",
    "KUBEINFER_REDIS_URL", "KUBEINFER_SUCCESS_URL", "KUBEINFER_TRANSIENT_BUDGET_S",
    "KUBEINFER_VISIBILITY_TIMEOUT_S",
})
#: An Endpoint's image step's: ``render.plan_steps.IMAGE_STEP_ENV``.
IMAGE_STEP_OPERATOR_ENV = frozenset({"SAGEMAKER_BIND_TO_PORT"})
#: A TransformJob's batch processes' and image model's (its ``environment`` reaches
#: either): ``render.transform_plan.BATCH_ENV | SAGEMAKER_ENV``, and any name starting
#: with ``SAGEMAKER_BATCH`` (``transform_plan.env_problems``).
BATCH_OPERATOR_ENV = frozenset({
    "JOB_COMPLETION_INDEX", "KUBEINFER_ACCEPT", "KUBEINFER_ASSEMBLE_WITH",
    "KUBEINFER_BATCH_ACROSS_OBJECTS", "KUBEINFER_BATCH_STRATEGY", "KUBEINFER_COMPRESSION",
    "KUBEINFER_DATA_TYPE", "KUBEINFER_HOST", "KUBEINFER_INPUT_CONTENT_TYPE",
    "KUBEINFER_INPUT_FILTER", "KUBEINFER_INPUT_URI", "KUBEINFER_INSTANCE_COUNT",
    "KUBEINFER_INVOCATION_RETRIES", "KUBEINFER_INVOCATION_TIMEOUT_S", "KUBEINFER_JOB",
    "KUBEINFER_JOIN_SOURCE", "KUBEINFER_MAX_BATCH_PAYLOAD_BYTES",
    "KUBEINFER_MAX_CONCURRENT_TRANSFORMS", "KUBEINFER_MAX_FAILED_RECORDS",
    "KUBEINFER_MODEL_CACHE_DIR", "KUBEINFER_MODEL_FORMAT", "KUBEINFER_MODEL_URI",
    "KUBEINFER_MODEL_URL", "KUBEINFER_OUTPUT_FILTER", "KUBEINFER_OUTPUT_URI",
    "KUBEINFER_PIPELINE", "KUBEINFER_PORT", "KUBEINFER_PROGRESS_FILE", "KUBEINFER_REPORT_FILE",
    "KUBEINFER_SHARDS", "KUBEINFER_SPLIT_TYPE", "KUBEINFER_START_GATE", "SAGEMAKER_BATCH",
    "SAGEMAKER_BATCH_STRATEGY", "SAGEMAKER_BIND_TO_PORT", "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS",
    "SAGEMAKER_MAX_PAYLOAD_IN_MB",
})
BATCH_OPERATOR_PREFIXES = ("SAGEMAKER_BATCH",)
#: A TransformJob's image step's: ``render.transform_plan.SAGEMAKER_ENV``.
BATCH_IMAGE_STEP_OPERATOR_ENV = frozenset({
    "SAGEMAKER_BATCH", "SAGEMAKER_BATCH_STRATEGY", "SAGEMAKER_BIND_TO_PORT",
    "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS", "SAGEMAKER_MAX_PAYLOAD_IN_MB",
})
#: A CompilationJob's compiler's: ``render.compile_plan.COMPILER_OPERATOR_ENV``.
COMPILER_OPERATOR_ENV = frozenset({
    "KUBEINFER_ALLOW_QUANTIZATION", "KUBEINFER_BATCH_SIZES", "KUBEINFER_CALIBRATION_URI",
    "KUBEINFER_MIN_TOP1_AGREEMENT", "KUBEINFER_MODEL_URI", "KUBEINFER_OUTPUT_URI",
    "KUBEINFER_REPORT_FILE", "KUBEINFER_TARGET", "KUBEINFER_THREADS",
    "KUBEINFER_TUNING_BUDGET_S", "KUBEINFER_TUNING_CACHE_DIR", "KUBEINFER_TUNING_CACHE_URI",
    "KUBEINFER_TUNING_TRIALS", "KUBEINFER_WORK_DIR",
})


@dataclass(frozen=True)
class CelRule:
    """One ``x-kubernetes-validations`` entry and where it goes."""

    #: Schema node, from the object's root: ``spec.variants[].model`` ('[]': the items);
    #: '' is the root (the only node whose rules may read ``self.metadata.name``).
    at: str
    rule: str
    message: str
    #: The field the API server names, relative to ``at`` (``.async``); no list indexes.
    field_path: str | None = None

    def entry(self) -> dict[str, str]:
        out = {"rule": self.rule, "message": self.message}
        if self.field_path is not None:
            out["fieldPath"] = self.field_path
        return out


def _or_default(model: type[BaseModel], field: str, var: str = "self") -> str:
    """``field`` of ``var`` as CEL, its model default when absent (a required field is
    never absent: the API server's schema refuses the object first)."""
    info = model.model_fields[field]
    if info.is_required():
        return f"{var}.{field}"
    default = info.default
    if isinstance(default, bool):
        literal = "true" if default else "false"
    elif isinstance(default, str):
        literal = f"'{default}'"
    elif isinstance(default, int | float):
        literal = repr(default)
    else:
        raise TypeError(f"{model.__name__}.{field}: no CEL literal for {default!r}")
    return f"(has({var}.{field}) ? {var}.{field} : {literal})"


def _or_default_list(model: type[BaseModel], field: str, var: str = "self") -> str:
    """A list-of-strings ``field`` of ``var`` as CEL, its model default when absent."""
    info = model.model_fields[field]
    default = info.default_factory() if info.default_factory else info.default  # type: ignore[call-arg]
    return f"(has({var}.{field}) ? {var}.{field} : {_strings(default)})"


def _strings(values: Any) -> str:
    return "[" + ", ".join(f"'{v}'" for v in sorted(str(x) for x in values)) + "]"


def _exactly_one(fields: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"has(self.{f})" for f in fields) + "].filter(x, x).size() == 1"


def _unique(items: str, key: str = "") -> str:
    """Each element of the list ``items`` once (by ``key``, a '.field' suffix)."""
    return f"{items}.all(a, {items}.exists_one(b, b{key} == a{key}))"


def name_rule(kind: str, how: str) -> CelRule:
    """``metadata.name`` must extend into child names (``how``: the fix's verb)."""
    return CelRule(
        "",
        f"size(self.metadata.name) <= {MAX_RESOURCE_NAME} && "
        f"self.metadata.name.matches('{NAME_PATTERN}')",
        f"must start with a letter, use only lowercase letters, digits and '-', and have at "
        f"most {MAX_RESOURCE_NAME} characters; {how} the {kind} under such a name",
        ".metadata.name")


def _model_source(at: str) -> CelRule:
    return CelRule(
        at, "!has(self.compile) || !has(self.format) || self.format == 'onnx'",
        "compile: compiles an ONNX model, and format compiled is already compiled; remove "
        "compile or set format: onnx")


def _step_rules(at: str) -> list[CelRule]:
    """A multi-container step (``api.endpoint.ContainerStep._one_kind``)."""
    return [
        CelRule(at, _exactly_one(("model", "handler", "image")),
                "set exactly one of model, handler, image"),
        CelRule(at, "!has(self.codeUri) || has(self.handler)",
                "codeUri applies to handler steps only; remove it"),
        CelRule(at, "has(self.image) || (!has(self.port) && "
                    "(!has(self.env) || size(self.env) == 0))",
                "port and env apply to image steps only; remove them"),
        CelRule(at, "has(self.image) || !has(self.resources)",
                "resources apply to image steps only (the variant's resources size the model "
                "server); remove it"),
    ]


def _min_max(at: str, model: type[BaseModel], message: str) -> CelRule:
    return CelRule(at, f"{_or_default(model, 'minReplicas')} <= "
                       f"{_or_default(model, 'maxReplicas')}", message)


_MIN_MAX = "minReplicas exceeds maxReplicas; lower minReplicas or raise maxReplicas"


def _autoscaling(fleets: str) -> list[CelRule]:
    """The rules of an ``autoscaling`` block under ``spec.<fleets>[]``."""
    at = f"spec.{fleets}[].autoscaling"
    return [
        _min_max(at, ep.AutoScaling, _MIN_MAX),
        CelRule(at, f"has(self.prometheusUrl) || !({_custom_metric('targetTracking')} || "
                    f"{_custom_metric('stepScaling')})",
                "a Custom metric needs prometheusUrl; set it to your Prometheus server"),
        *(CelRule(f"{at}.{policies}[]", "(self.metric == 'Custom') == has(self.query)",
                  "set query exactly when metric is Custom")
          for policies in ("targetTracking", "stepScaling")),
        CelRule(f"{at}.scheduled[]", "self.minReplicas <= self.maxReplicas", _MIN_MAX),
    ]
_TYPE = f"(has(self.type) ? self.type : '{ep.EndpointType.REAL_TIME.value}')"


def _custom_metric(policies: str) -> str:
    return f"(has(self.{policies}) && self.{policies}.exists(p, p.metric == 'Custom'))"


def _prefixed(var: str, prefixes: Iterable[str]) -> str:
    return " || ".join(f"{var}.startsWith('{p}')" for p in prefixes)


def _less(problem: str | None, lead: str) -> str:
    """The operator's ``problem`` less its ``lead`` (the value CEL cannot print)."""
    assert problem is not None and problem.startswith(lead), (problem, lead)
    return problem.removeprefix(lead)


# -- the env policy (api.env_policy), from its own sets and messages -------------------------


@dataclass(frozen=True)
class EnvRefusal:
    """One of ``env_policy.refusal``'s reasons for one kind of container, as CEL."""

    #: The names it refuses, less those an earlier reason refuses (one message per name,
    #: the operator's).
    names: frozenset[str]
    prefixes: tuple[str, ...]
    #: Names its prefixes match that an earlier reason refuses.
    unless: frozenset[str]
    #: ``refusal``'s message less the name it starts with ('is set by the operator; ...').
    message: str

    def refuses(self, var: str) -> str:
        """CEL: the name ``var`` is refused for this reason."""
        cond = " || ".join(([f"{var} in {_strings(self.names)}"] if self.names else [])
                           + ([_prefixed(var, self.prefixes)] if self.prefixes else []))
        return f"({cond}) && !({var} in {_strings(self.unless)})" if self.unless else cond

    def matches(self, name: str) -> bool:
        """What ``refuses`` says of ``name``, in Python."""
        return (name in self.names or name.startswith(self.prefixes)) and (
            name not in self.unless)


def env_refusals(operator_env: AbstractSet[str], operator_prefixes: tuple[str, ...] = (), *,
                 kubeinfer_image: bool = True, compiler: bool = False) -> tuple[EnvRefusal, ...]:
    """``env_policy.refusal``'s reasons, in its order, for a container the operator renders
    ``operator_env`` (and any name with ``operator_prefixes``) into."""
    reasons: list[tuple[AbstractSet[str], tuple[str, ...]]] = [(operator_env, operator_prefixes)]
    if kubeinfer_image:
        reasons += [(envp.OPERATOR_SETTINGS_ENV, ()),
                    (envp.INTERPRETER_ENV, envp.INTERPRETER_PREFIXES),
                    (envp.RESOLVER_ENV, ())]
        if compiler:
            reasons.append((envp.COMPILER_ENV, ()))
    out: list[EnvRefusal] = []
    earlier: set[str] = set()
    earlier_prefixes: tuple[str, ...] = ()
    for i, (names, prefixes) in enumerate(reasons):
        own = frozenset(n for n in names if n not in earlier
                        and not n.startswith(earlier_prefixes))
        if own or prefixes:
            sample = min(own) if own else prefixes[0] + "X"
            # (the operator's own set holds each name its prefixes match: add the sample's)
            why = envp.refusal(sample, {*operator_env, sample} if i == 0 else operator_env,
                               kubeinfer_image=kubeinfer_image, compiler=compiler)
            out.append(EnvRefusal(own, prefixes,
                                  frozenset(n for n in earlier if n.startswith(prefixes)),
                                  _less(why, f"{sample} ")))
        earlier |= names
        earlier_prefixes += prefixes
    return tuple(out)


#: A model server's env (a variant's or a shadow variant's), an Endpoint image step's, a
#: TransformJob's ``environment`` and image step's, a CompilationJob's ``environment``.
SERVER_ENV_REFUSALS = env_refusals(SERVER_OPERATOR_ENV)
IMAGE_STEP_ENV_REFUSALS = env_refusals(IMAGE_STEP_OPERATOR_ENV, kubeinfer_image=False)
BATCH_ENV_REFUSALS = env_refusals(BATCH_OPERATOR_ENV, BATCH_OPERATOR_PREFIXES)
BATCH_IMAGE_STEP_ENV_REFUSALS = env_refusals(BATCH_IMAGE_STEP_OPERATOR_ENV,
                                             kubeinfer_image=False)
COMPILER_ENV_REFUSALS = env_refusals(COMPILER_OPERATOR_ENV, compiler=True)
#: What an Async endpoint's worker refuses beyond a model server's reasons.
ASYNC_WORKER_ONLY_ENV = frozenset(
    n for n in ASYNC_WORKER_OPERATOR_ENV if not any(r.matches(n) for r in SERVER_ENV_REFUSALS))


def _env_rules(at: str, refusals: tuple[EnvRefusal, ...]) -> list[CelRule]:
    """On the items of an ``env`` list (name and value), naming ``.name``."""
    return [CelRule(at, f"!({r.refuses('self.name')})", r.message, ".name") for r in refusals]


def _environment_rule(refusal: EnvRefusal) -> str:
    """CEL of an ``environment`` map (name to value) ``refusal`` refuses none of."""
    return f"self.environment.all(k, !({refusal.refuses('k')}))"


def _environment_message(refusal: EnvRefusal) -> str:
    return f"names a variable that {refusal.message}"


# -- podTemplate (api.placement's deny-list and reserved keys, from its own sets) ------------

#: A label or annotation key under a service mesh's domain or a subdomain of it (what
#: ``placement.escalating_key_problem`` parses: the prefix before the last '/').
MESH_KEY_PATTERN = ("^(.*\\\\.)?("
                    + "|".join(d.replace(".", "\\\\.") for d in pl.MESH_DOMAINS) + ")/[^/]*$")


def _key_rules(at: str, what: str) -> list[CelRule]:
    """On a podTemplate's ``labels`` or ``annotations`` map (``what``: label, annotation)."""
    article = "an" if what[0] in "aeiou" else "a"
    reserved, confined = pl.RESERVED_PREFIXES[0] + "x", pl.CONFINEMENT_PREFIXES[0] + "x"
    mesh = pl.MESH_DOMAINS[0] + "/x"
    return [
        CelRule(at, f"self.all(k, !({_prefixed('k', pl.RESERVED_PREFIXES)}))",
                f"{article} {what} " + _less(pl.reserved_key_problem(reserved, what),
                                              f"{what} {reserved!r} ")),
        CelRule(at, f"self.all(k, !({_prefixed('k', pl.CONFINEMENT_PREFIXES)}))",
                f"{article} {what} " + _less(pl.escalating_key_problem(confined, what),
                                              f"{what} {confined!r} ")),
        CelRule(at, f"self.all(k, !k.matches('{MESH_KEY_PATTERN}'))",
                f"{article} {what} " + _less(pl.escalating_key_problem(mesh, what),
                                              f"{what} {mesh!r} ")),
    ]


def pod_template_rules(at: str) -> list[CelRule]:
    """A ``podTemplate`` (``api.placement.PodTemplate``) as a spec may write it: what its
    deny-list refuses, and the operator's own label and annotation keys. Its syntax checks
    (label keys and values, DNS names, a toleration's operator and effect, a spread
    constraint's fields) and the annotations' 256 KiB total stay the operator's: Kubernetes
    checks the rendered pod anyway, and a total over a map is beyond CEL's macros."""
    taint = pl.CONTROL_PLANE_TAINTS[0]
    system = pl.SYSTEM_PRIORITY_PREFIX + "x"
    return [
        CelRule(f"{at}.tolerations[]", "has(self.key) && self.key != ''",
                _less(pl.toleration_problem(0, {}), "tolerations[0] ")),
        CelRule(f"{at}.tolerations[]",
                f"!has(self.key) || !(self.key in {_strings(pl.CONTROL_PLANE_TAINTS)})",
                "its key " + _less(pl.toleration_problem(0, {"key": taint}),
                                   f"tolerations[0].key {taint!r} ")),
        CelRule(f"{at}.priorityClassName",
                f"!self.startsWith('{pl.SYSTEM_PRIORITY_PREFIX}')",
                _less(pl.priority_problem(system), f"priorityClassName {system!r} ")),
        *_key_rules(f"{at}.labels", "label"),
        *_key_rules(f"{at}.annotations", "annotation"),
    ]


ENDPOINT_RULES: tuple[CelRule, ...] = (
    name_rule("Endpoint", "recreate"),
    CelRule("", f"self.spec.variants.all(v, size(self.metadata.name) + 1 + size(v.name) <= "
                f"{MAX_OBJECT_NAME})",
            f"name: a variant's object name <endpoint>-<variant> would be longer than "
            f"{MAX_OBJECT_NAME} characters; shorten the variant or Endpoint name",
            ".spec.variants"),
    # A shadow variant's Service is <endpoint>-<shadow> too (reconcile.validate checks both).
    CelRule("", "!has(self.spec.shadowVariants) || self.spec.shadowVariants.all(v, "
                f"size(self.metadata.name) + 1 + size(v.name) <= {MAX_OBJECT_NAME})",
            f"name: a variant's object name <endpoint>-<variant> would be longer than "
            f"{MAX_OBJECT_NAME} characters; shorten the variant or Endpoint name",
            ".spec.shadowVariants"),
    # A guarded variant's green fleet: its Service <endpoint>-<variant>-green (render.rollout).
    CelRule("", "!has(self.spec.deploymentConfig) || self.spec.variants.all(v, "
                f"size(self.metadata.name) + 1 + size(v.name) + {len(GREEN_SUFFIX)} <= "
                f"{MAX_OBJECT_NAME})",
            f"name: under deploymentConfig a variant's green fleet <endpoint>-<variant>"
            f"{GREEN_SUFFIX} would be longer than {MAX_OBJECT_NAME} characters; shorten the "
            "variant or Endpoint name",
            ".spec.variants"),
    # spec (api.endpoint.EndpointSpec._check_variants and _check_async)
    CelRule("spec.variants", "self.exists(v, !has(v.weight) || v.weight > 0.0)",
            "weight: all weights are 0; give at least one variant a weight above 0"),
    CelRule("spec", f"!has(self.async) || {_TYPE} == 'Async'",
            "applies to type Async only; remove it or set type: Async", ".async"),
    CelRule("spec", f"{_TYPE} != 'Async' || has(self.async)",
            "is required for type Async: set at least async.outputPath (s3://bucket/prefix)",
            ".async"),
    CelRule("spec", f"{_TYPE} != 'Async' || size(self.variants) == 1",
            "an Async endpoint takes exactly one variant; split them into separate endpoints",
            ".variants"),
    CelRule("spec", f"{_TYPE} != 'Async' || self.variants.all(v, !has(v.autoscaling))",
            "autoscaling: Async endpoints scale on the queue backlog; use spec.async.scaling "
            "instead", ".variants"),
    CelRule("spec", f"{_TYPE} != 'Async' || self.variants.all(v, has(v.model))",
            "an Async endpoint's workers serve one model: set model (multiModel and "
            "containers run on RealTime and Serverless endpoints)", ".variants"),
    CelRule("spec", f"!has(self.serverless) || {_TYPE} == 'Serverless'",
            "applies to type Serverless only; remove it or set type: Serverless",
            ".serverless"),
    CelRule("spec.serverless", f"{_or_default(ep.ServerlessConfig, 'provisionedConcurrency')} "
                               f"<= {_or_default(ep.ServerlessConfig, 'maxConcurrency')}",
            "provisionedConcurrency exceeds maxConcurrency; lower it or raise maxConcurrency"),
    CelRule("spec.auth", "!has(self.mode) || self.mode != 'None' || (!has(self.secretName) "
                         "&& (!has(self.regions) || size(self.regions) == 0))",
            "auth.secretName and auth.regions apply to modes SigV4 and Token; remove them or "
            "set auth.mode"),
    CelRule("spec.auth", "!has(self.mode) || self.mode != 'Token' || !has(self.regions) || "
                         "size(self.regions) == 0",
            "auth.regions applies to mode SigV4 only; remove it"),
    _min_max("spec.async.scaling", ac.AsyncScaling, _MIN_MAX),
    # data capture (api.endpoint.EndpointSpec._check_variants, api.data_capture.DataCapture)
    CelRule("spec", f"!has(self.dataCapture) || {_TYPE} != 'Async'",
            "applies to RealTime and Serverless endpoints; remove it (Async endpoints keep "
            "every input and output in the object store already)", ".dataCapture"),
    CelRule("spec.dataCapture", "!has(self.captureOptions) || "
                                + _unique("self.captureOptions"),
            "captureOptions repeats a mode; list Input and/or Output once each"),
    CelRule("spec.dataCapture",
            f"!{_or_default_list(dc.DataCapture, 'csvContentTypes')}.exists(c, "
            f"{_or_default_list(dc.DataCapture, 'jsonContentTypes')}.exists(j, j == c))",
            "a content type is in both csvContentTypes and jsonContentTypes; list each in one "
            "of them"),
    # one variant (api.endpoint.ProductionVariant, reconcile.validate._variant_problems)
    CelRule("spec.variants[]", _exactly_one(("model", "multiModel", "containers")),
            "set exactly one of model, multiModel, containers"),
    CelRule("spec.variants[]", "!has(self.inferenceExecution) || has(self.containers)",
            "inferenceExecution applies to containers only; remove it"),
    CelRule("spec.variants[]", "!has(self.containers) || "
                               + _unique("self.containers", ".name"),
            "duplicate container name(s); give each step a unique name"),
    CelRule("spec.variants[]", f"!(self.name in {_strings(RESERVED_VARIANT_NAMES)})",
            "is reserved for the Endpoint's own gateway objects; rename the variant", ".name"),
    # env (api.env_policy, reconcile.validate.env_spec_problems)
    *_env_rules("spec.variants[].env[]", SERVER_ENV_REFUSALS),
    *_env_rules("spec.variants[].containers[].env[]", IMAGE_STEP_ENV_REFUSALS),
    # An Async endpoint's workers are rendered more names: refused on the spec, which knows
    # the type (KUBEINFER_OUTBOUND_ALLOW and KUBEINFER_REDIS_URL, also the operator's own
    # settings, with that message; shadow variants are refused on Async endpoints below).
    CelRule("spec", f"{_TYPE} != 'Async' || self.variants.all(v, !has(v.env) || "
                    f"v.env.all(e, !(e.name in {_strings(ASYNC_WORKER_ONLY_ENV)})))",
            "env.name: names a variable that, on an Async endpoint, "
            + env_refusals(SERVER_OPERATOR_ENV | ASYNC_WORKER_OPERATOR_ENV)[0].message,
            ".variants"),
    _model_source("spec.variants[].model"),
    CelRule("spec.variants[].model.compile",
            f"!has(self.target) || !(self.target in {_strings(t.value for t in CROSS_TARGETS)})",
            "is cross-compiled and cannot be timed where it is compiled, and a variant "
            "compiles on the node that serves it: use native, or a CompilationJob for another "
            "machine", ".target"),
    CelRule("spec.variants[].model.compile",
            "!has(self.batchSizes) || " + _unique("self.batchSizes"),
            "repeats a size; list each once, e.g. [1, 64]", ".batchSizes"),
    *_step_rules("spec.variants[].containers[]"),
    # (so ModelSource's format rule is moot on a step's model)
    CelRule("spec.variants[].containers[]", "!has(self.model) || !has(self.model.compile)",
            "only a variant's own model compiles before it is served; run a CompilationJob "
            "and give the step its artifact (model.format: compiled)", ".model.compile"),
    # shadow variants (api.endpoint._check_shadows, ShadowVariant, reconcile.validate)
    CelRule("spec", f"!has(self.shadowVariants) || size(self.shadowVariants) == 0 || "
                    f"{_TYPE} != 'Async'",
            "applies to RealTime and Serverless endpoints; remove it (an Async endpoint's "
            "requests are queued, not answered synchronously)", ".shadowVariants"),
    CelRule("spec", "!has(self.shadowVariants) || "
                    "self.shadowVariants.all(s, !self.variants.exists(v, v.name == s.name))",
            "a shadow variant's name is already used by a variant; give each a unique name",
            ".shadowVariants"),
    CelRule("spec.shadowVariants[]", _exactly_one(("model", "multiModel", "containers")),
            "set exactly one of model, multiModel, containers"),
    CelRule("spec.shadowVariants[]", "!has(self.inferenceExecution) || has(self.containers)",
            "inferenceExecution applies to containers only; remove it"),
    CelRule("spec.shadowVariants[]", "!has(self.admission)",
            "admission applies to production variants; remove it"),
    CelRule("spec.shadowVariants[]",
            "!has(self.autoscaling) || "
            f"({_or_default(ep.AutoScaling, 'minReplicas', 'self.autoscaling')} >= 1 && "
            "(!has(self.autoscaling.scheduled) || "
            "self.autoscaling.scheduled.all(s, s.minReplicas >= 1)))",
            "autoscaling cannot scale a shadow to zero (its copies would all be dropped); set "
            "minReplicas (and each schedule's) to 1 or more"),
    CelRule("spec.shadowVariants[]", f"!(self.name in {_strings(RESERVED_VARIANT_NAMES)})",
            "is reserved for the Endpoint's own gateway objects; rename the variant", ".name"),
    *_env_rules("spec.shadowVariants[].env[]", SERVER_ENV_REFUSALS),
    *_env_rules("spec.shadowVariants[].containers[].env[]", IMAGE_STEP_ENV_REFUSALS),
    # auto scaling (api.endpoint.AutoScaling, ScheduledScaling, _MetricRef), of variants
    # and shadow variants alike
    *(rule for fleets in ("variants", "shadowVariants") for rule in _autoscaling(fleets)),
    # deployment guardrails (api.deployment_config, api.endpoint._check_guardrails)
    CelRule("spec", f"!has(self.deploymentConfig) || {_TYPE} == "
                    f"'{ep.EndpointType.REAL_TIME.value}'",
            "applies to RealTime endpoints; remove it: Serverless and Async endpoints update "
            "their variants in place", ".deploymentConfig"),
    CelRule("spec", "!has(self.deploymentConfig) || !has(self.deploymentConfig.rolling) || "
                    "size(self.variants) == 1",
            "applies to endpoints with one variant (as in SageMaker); use "
            "deploymentConfig.blueGreen, or keep one of variants", ".deploymentConfig.rolling"),
    CelRule("spec.deploymentConfig", _exactly_one(("blueGreen", "rolling")),
            "set exactly one of blueGreen, rolling"),
    CelRule("spec.deploymentConfig.blueGreen.trafficRouting",
            "has(self.canarySize) == (self.type == 'Canary') && "
            "has(self.linearStepSize) == (self.type == 'Linear')",
            "set canarySize exactly when type is Canary, linearStepSize exactly when type is "
            "Linear"),
    CelRule("spec.deploymentConfig.autoRollback.alarms[]",
            _exactly_one(("errorRate", "latencyP99Ms", "promQL", "disagreement")),
            "set exactly one of errorRate, latencyP99Ms, promQL, disagreement"),
    CelRule("spec.deploymentConfig.autoRollback.alarms[]",
            "!has(self.mirrorSamplingPercentage) || has(self.disagreement)",
            "mirrorSamplingPercentage applies to disagreement alarms; remove it or set "
            "disagreement"),
    CelRule("spec.deploymentConfig.autoRollback",
            "has(self.prometheusUrl) || !has(self.alarms) || "
            "!self.alarms.exists(a, has(a.promQL))",
            "a promQL alarm needs prometheusUrl; set it to your Prometheus server"),
    # podTemplate (api.placement)
    *(rule for at in ("spec.gateway.podTemplate", "spec.variants[].podTemplate",
                      "spec.shadowVariants[].podTemplate") for rule in pod_template_rules(at)),
)

_NO_COMPILE = ("a TransformJob runs its model as given; run a CompilationJob and give the job "
               "its artifact (model.format: compiled)")
_FILTERABLE = "|".join(tj.FILTERABLE_TYPES)
_DATA_PROCESSING_ACTIVE = (
    "has(self.dataProcessing) && ("
    "(has(self.dataProcessing.inputFilter) && self.dataProcessing.inputFilter != '$') || "
    "(has(self.dataProcessing.outputFilter) && self.dataProcessing.outputFilter != '$') || "
    "(has(self.dataProcessing.joinSource) && self.dataProcessing.joinSource != 'None'))")

TRANSFORM_JOB_RULES: tuple[CelRule, ...] = (
    name_rule("TransformJob", "create"),
    # api.transform_job.TransformJobSpec._check and spec_problems
    CelRule("spec", _exactly_one(("model", "containers", "endpointRef")),
            "spec.model, spec.containers, spec.endpointRef: set exactly one"),
    CelRule("spec.containers", _unique("self", ".name"),
            "duplicate container name(s); give each step a unique name"),
    # Python strips the parameters and blanks and lowercases; (?i:) and \s say the same.
    CelRule("spec", f"!({_DATA_PROCESSING_ACTIVE}) || (has(self.input.contentType) && "
                    f"self.input.contentType.matches('^\\\\s*(?i:{_FILTERABLE})\\\\s*(?s:;.*)?$'))",
            "cannot be filtered or joined; dataProcessing needs one of "
            + ", ".join(tj.FILTERABLE_TYPES) + " (or remove the filters and joinSource)",
            ".input.contentType"),
    CelRule("spec", "!has(self.maxPayloadInMB) || self.maxPayloadInMB != 0 || "
                    "!has(self.input.splitType) || self.input.splitType == 'None'",
            "0 sends each object whole, which a splitType other than None contradicts; set "
            "splitType None or a payload limit of 1 to 100 MB", ".maxPayloadInMB"),
    # The operator compares parsed locations; this compares the strings with a '/' closing
    # each, which agrees on every URI without repeated slashes (s3://b//p).
    CelRule("spec", "(has(self.input.dataType) && self.input.dataType != 'S3Prefix') || "
                    "!(self.output.uri + '/').startsWith(self.input.uri.endsWith('/') ? "
                    "self.input.uri : self.input.uri + '/')",
            "is inside the input, so outputs would be read as input by a later run; "
            "write outputs under another prefix", ".output.uri"),
    # reconcile.transform_validate (a step's or the job's model never compiles, whatever
    # its format: the rule ModelSource has on variants is moot here)
    CelRule("spec.model", "!has(self.compile)", _NO_COMPILE, ".compile"),
    *_step_rules("spec.containers[]"),
    CelRule("spec.containers[]", "!has(self.model) || !has(self.model.compile)", _NO_COMPILE,
            ".model.compile"),
    # env (api.env_policy, render.transform_plan.env_problems). What the operator renders
    # is refused in any environment; the other reasons only where the environment reaches
    # kubeinfer's batch worker: a model, or steps without an image. An endpointRef's
    # Endpoint decides that (and brings its variant's env): the operator checks it.
    CelRule("spec", f"!has(self.environment) || {_environment_rule(BATCH_ENV_REFUSALS[0])}",
            _environment_message(BATCH_ENV_REFUSALS[0]), ".environment"),
    *(CelRule("spec", "has(self.endpointRef) || (has(self.containers) && "
                      "self.containers.exists(c, has(c.image))) || !has(self.environment) || "
                      + _environment_rule(r), _environment_message(r), ".environment")
      for r in BATCH_ENV_REFUSALS[1:]),
    *_env_rules("spec.containers[].env[]", BATCH_IMAGE_STEP_ENV_REFUSALS),
    *pod_template_rules("spec.podTemplate"),
)

COMPILATION_JOB_RULES: tuple[CelRule, ...] = (
    name_rule("CompilationJob", "create"),
    CelRule("spec.batchSizes", _unique("self"), "repeats a size; list each once, e.g. [1, 64]"),
    # env (api.env_policy, render.compile_plan.plan_compile)
    *(CelRule("spec", f"!has(self.environment) || {_environment_rule(r)}",
              _environment_message(r), ".environment") for r in COMPILER_ENV_REFUSALS),
    *pod_template_rules("spec.podTemplate"),
)

RECOMMENDATION_JOB_RULES: tuple[CelRule, ...] = (
    name_rule("RecommendationJob", "create"),
    CelRule("spec", "has(self.model) != has(self.endpointRef)",
            "set exactly one of model and endpointRef"),
    CelRule("spec", "!(has(self.candidates) && has(self.grid))",
            "set candidates or grid, not both"),
    # (no env and no podTemplate of its own: an endpointRef's Endpoint's are checked by the
    # Endpoint's rules)
)

EDGE_FLEET_RULES: tuple[CelRule, ...] = (
    *pod_template_rules("spec.server.podTemplate"),
)


def _node(schema: dict[str, Any], at: str) -> dict[str, Any]:
    node = schema
    for part in at.split(".") if at else []:
        items = part.endswith("[]")
        node = node["properties"][part.removesuffix("[]")]
        if items:
            node = node["items"]
    return node


def attach(schema: dict[str, Any], rules: tuple[CelRule, ...]) -> None:
    """Append each rule to the ``x-kubernetes-validations`` of its node of ``schema``."""
    for rule in rules:
        _node(schema, rule.at).setdefault("x-kubernetes-validations", []).append(rule.entry())
