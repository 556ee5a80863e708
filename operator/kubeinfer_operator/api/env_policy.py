"""Which environment variables a spec may add to a container kubeinfer renders: PURE.

Users add env to what the operator renders: a variant's ``env`` (and its image
steps'), a TransformJob's ``environment`` and the Endpoint variant env it copies,
a CompilationJob's ``environment``. Env is configuration; it must not become a
way around the spec's checks or the operator's policy, so ``env_problems``
refuses, naming the field and the key:

* what the operator renders into that container itself (the model, the job's
  input and output, the queue, ports, shard index): the caller passes that set,
  kept next to its renderer, where a unit test holds it equal to what the
  renderer emits. Overriding one would run what the spec's checks refused (a
  ``file://`` input on Kubernetes, another bucket, another pipeline);
* in kubeinfer's own images, what changes which code they load before any of
  kubeinfer's runs: the dynamic loader (``LD_*``), Python's start-up and search
  paths, the compiler a CompilationJob runs. Endpoint authors run code, but as
  handler steps, named in the spec; these containers hold the operator's S3
  credentials, and CompilationJobs and model-only TransformJobs run no user code;
  and what changes where they resolve host names (``LOCALDOMAIN``, ``RES_OPTIONS``,
  ``HOSTALIASES``: the pod's DNS is the operator's);
* in kubeinfer's own images, a ``KUBEINFER_*`` name not in upper case: the runtime
  reads upper-case names only (before, it matched any case with the later spelling
  winning, so ``kubeinfer_redis_url`` replaced the operator's ``KUBEINFER_REDIS_URL``
  past every check here, which compares names as written);
* the operator's own settings and credentials (the outbound allow-list that keeps
  webhooks off cluster-internal addresses, the queue's Redis URL, the scaler and
  fleet tokens, the object store's endpoint and keys): they reach pods from the
  operator alone, secrets by reference, never as a spec's literal.

A user's own image (an image step, a TransformJob's image model) is theirs:
there only what the operator renders is refused. Runtime tuning documented
for users (``KUBEINFER_WORKERS``, ``KUBEINFER_INTRA_OP_THREADS``, the
``KUBEINFER_HTTP_*`` bounds, ``KUBEINFER_MAX_PAYLOAD_BYTES`` of a real-time
variant, ``KUBEINFER_MEASURE_S``, ``OMP_NUM_THREADS``, ...) is none of these and
stays the user's. Every renderer also merges the operator's values last
(``operator_wins``), so a spec that skipped validation still cannot override them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet

#: kubeinfer's own settings. Read by their upper-case names only
#: (``contract.env_settings``): another spelling is refused, not silently ignored.
KUBEINFER_PREFIX = "KUBEINFER_"
#: Loader and interpreter variables: each makes kubeinfer's image load other code (or
#: look for it elsewhere). Refused whatever the value: an empty one overrides the image's
#: own as surely as a path does.
INTERPRETER_ENV: frozenset[str] = frozenset({
    "PATH", "GCONV_PATH", "OPENSSL_CONF", "OPENSSL_ENGINES", "OPENSSL_MODULES",
    "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "PYTHONNOUSERSITE",
    "PYTHONINSPECT", "PYTHONEXECUTABLE", "PYTHONSAFEPATH", "PYTHONPLATLIBDIR",
    "PYTHONPYCACHEPREFIX", "PYTHONBREAKPOINT",
})
#: Prefixes of the same: the dynamic loader reads every ``LD_*`` (``LD_PRELOAD``,
#: ``LD_LIBRARY_PATH``, ``LD_AUDIT``, ...).
INTERPRETER_PREFIXES: tuple[str, ...] = ("LD_",)
#: What changes how the C library resolves host names (the search domains, resolver
#: options, an aliases file): the object store's, Redis's and the webhooks' hosts would
#: be looked up where the spec says, while the pod's DNS is the operator's (a podTemplate
#: has no dnsConfig or hostAliases).
RESOLVER_ENV: frozenset[str] = frozenset({"LOCALDOMAIN", "RES_OPTIONS", "HOSTALIASES"})
#: What picks the compiler, its helpers, headers and libraries a CompilationJob (or a
#: variant's compile step) runs and links into the artifact it publishes.
COMPILER_ENV: frozenset[str] = frozenset({
    "CC", "CXX", "CPATH", "C_INCLUDE_PATH", "CPLUS_INCLUDE_PATH", "LIBRARY_PATH",
    "COMPILER_PATH", "GCC_EXEC_PREFIX", "TVM_HOME", "TVM_LIBRARY_PATH", "TVM_NDK_CC",
})
#: The operator's settings and credentials, from its Helm values or Secrets only: the
#: allow-list, the Redis URL and the tokens (``secretKeyRef``), and the object store's
#: endpoint and keys (the chart's S3 Secret, ``envFrom``; a literal in the spec would win
#: over it and send the operator's signed requests elsewhere, or put a key in the spec).
OPERATOR_SETTINGS_ENV: frozenset[str] = frozenset({
    "KUBEINFER_OUTBOUND_ALLOW", "KUBEINFER_REDIS_URL", "KUBEINFER_SCALER_URL",
    "KUBEINFER_SCALER_TOKEN", "KUBEINFER_BOOTSTRAP_TOKEN", "KUBEINFER_STATUS_TOKEN",
    "KUBEINFER_EDGE_SIGNING_KEY", "KUBEINFER_EDGE_BOOTSTRAP_TOKEN",
    "KUBEINFER_S3_ENDPOINT_URL", "KUBEINFER_S3_ACCESS_KEY", "KUBEINFER_S3_SECRET_KEY",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
})


def refusal(name: str, operator_env: AbstractSet[str], *, kubeinfer_image: bool = True,
            compiler: bool = False) -> str | None:
    """Why a spec may not set ``name`` (None: it may), as the end of a problem message.

    ``operator_env``: what the operator renders into the container; ``kubeinfer_image``: the
    container runs kubeinfer's image (False: the user's); ``compiler``: it compiles.
    """
    if name in operator_env:
        return f"{name} is set by the operator; remove it from the spec"
    if not kubeinfer_image:
        return None
    if name in OPERATOR_SETTINGS_ENV:
        return (f"{name} is the operator's own setting (its Helm values and Secrets), "
                "never a spec's; remove it from the spec")
    if name != name.upper() and name.upper().startswith(KUBEINFER_PREFIX):
        return (f"{name} is not read: kubeinfer reads its settings by their upper-case "
                f"names only; write {name.upper()} (if the spec may set it)")
    if name in INTERPRETER_ENV or name.startswith(INTERPRETER_PREFIXES):
        return (f"{name} would change which code kubeinfer's image loads (the dynamic "
                "loader's or Python's start-up); remove it from the spec")
    if name in RESOLVER_ENV:
        return (f"{name} would change how kubeinfer's image resolves host names (the object "
                "store's, Redis's, webhooks'); remove it from the spec")
    if compiler and name in COMPILER_ENV:
        return (f"{name} would change the compiler, headers or libraries kubeinfer's "
                "compiler uses; remove it from the spec")
    return None


def env_problems(entries: Iterable[tuple[str, str]], operator_env: AbstractSet[str], *,
                 kubeinfer_image: bool = True, compiler: bool = False) -> list[str]:
    """One problem per refused entry; ``entries``: (field path, variable name) pairs, e.g.
    ``("spec.variants[0].env[1].name", "LD_PRELOAD")``."""
    return [f"{path}: {why}" for path, name in entries
            if (why := refusal(name, operator_env, kubeinfer_image=kubeinfer_image,
                               compiler=compiler)) is not None]


def environment_entries(environment: Mapping[str, str],
                        path: str = "spec.environment") -> list[tuple[str, str]]:
    """``env_problems`` entries of a name-to-value map (TransformJob, CompilationJob)."""
    return [(f"{path}.{name}", name) for name in environment]


def operator_wins(operator: Mapping[str, str], user: Mapping[str, str]) -> dict[str, str]:
    """``user`` env added to ``operator`` env, the operator's value kept on a clash.

    The operator's entries come first, as rendered before (so pods of valid specs keep
    their template); validation refuses the clashes, this keeps a spec that skipped it
    (an older object, a hand-written annotation) from winning one.
    """
    return {**operator, **{k: v for k, v in user.items() if k not in operator}}
