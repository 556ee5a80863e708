"""What an async Endpoint needs on a cluster that local mode supplies itself: PURE.

Local mode starts a private redis-server for async endpoints and its workers
share the machine's disk, so a missing queue setting and a ``file://`` output
are fine there. On Kubernetes neither holds: without the operator's Redis URL
the gateway has nowhere to enqueue (every request would fail while the
Endpoint said Ready), and a ``file://`` location is each worker pod's private
scratch directory, out of every caller's reach and gone with the pod. Both are
reported as InvalidSpec, naming the setting and the fix, before anything is
created.
"""

from __future__ import annotations

from kubeinfer_operator.render.plan import EndpointPlan

_FILE = "file://"
_LOCAL_ONLY = ("on Kubernetes each worker pod would use its own scratch directory, which no "
               "caller can read and which goes with the pod; use s3://bucket/prefix (file:// "
               "works in local mode only)")


def async_cluster_problems(plan: EndpointPlan, *, redis_url: str | None) -> list[str]:
    """Problems of an async Endpoint on Kubernetes (empty for other types)."""
    config = plan.async_config
    if config is None:
        return []
    problems = []
    if not redis_url:
        problems.append("spec.async: no queue is configured for async endpoints on this cluster "
                        "(the operator has no KUBEINFER_REDIS_URL); set the Helm value "
                        "runtime.redis.url, or runtime.redis.existingSecret when the URL holds "
                        "a password, and upgrade the release")
    if config.output_path.startswith(_FILE):
        problems.append(f"spec.async.outputPath: {config.output_path} is a file:// path; "
                        + _LOCAL_ONLY)
    elif config.failure_path.startswith(_FILE):
        # A failurePath defaulted from a file:// outputPath is covered by the line above.
        problems.append(f"spec.async.failurePath: {config.failure_path} is a file:// path; "
                        + _LOCAL_ONLY)
    if not config.output_path.startswith(_FILE):
        problems += [f"spec.async.inputPath[{i}]: {path} is a file:// path; " + _LOCAL_ONLY
                     for i, path in enumerate(config.input_paths) if path.startswith(_FILE)]
    return problems
