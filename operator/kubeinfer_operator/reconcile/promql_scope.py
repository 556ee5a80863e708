"""Tenants' PromQL may read only their own namespace's series (PURE).

Why this exists: an Endpoint's author writes PromQL that the operator sends to a
Prometheus (``autoscaling`` metrics of kind ``Custom``, ``promQL`` rollback alarms),
and the value comes back to the author: as a scaling decision, or as an alarm's value
in ``status.rollouts``. On a Prometheus shared by the cluster, a query like
``sum(rate(http_requests_total{namespace="payments"}[5m]))`` read another tenant's
series, one number at a time. So on Kubernetes every vector selector of such a query
must carry the equality matcher ``<label>="<the Endpoint's namespace>"``, where the
label is ``KUBEINFER_PROMQL_NAMESPACE_LABEL`` (the chart's
``security.promqlNamespaceLabel``, ``namespace`` by default, the label Prometheus's
Kubernetes service discovery conventionally sets). An empty label turns the check
off, for a single-tenant cluster or a Prometheus per tenant. Local mode has one user
and no namespaces and does not check.

The query is parsed with promql-parser (Prometheus's grammar, in Rust), checked, and
sent as written: never rewritten, so Prometheus runs exactly the text that was
checked. What the check cannot vouch for is refused rather than guessed at: ``or``
inside a selector's braces (Prometheus 3), and ``info()``, which reads
``target_info`` series that no selector in the query names.

The Prometheus URL the query goes to may carry no query string or fragment: Prometheus
reads the first ``query`` parameter, so ``.../api/v1/query?query=<anything>&x=`` would
have it run that instead of the checked query (the checked one appended after it).

``{namespace}`` in a query is replaced by the Endpoint's namespace (as ``{endpoint}``
and ``{variant}`` are in alarms), so one manifest serves every namespace.
"""

from __future__ import annotations

import promql_parser

#: Placeholder replaced by the Endpoint's namespace before a query is checked or sent.
NAMESPACE_PLACEHOLDER = "{namespace}"
#: What it is replaced by in local mode, which has no namespaces.
LOCAL_NAMESPACE = "default"
#: The label pinned when the operator's setting is not given.
DEFAULT_PROMQL_NAMESPACE_LABEL = "namespace"
#: Functions that read series no selector names.
_IMPLICIT_READS = frozenset({"info"})
#: Longest parser message quoted back (it may echo part of the query, the author's own).
_MAX_MESSAGE = 200


def with_namespace(query: str, namespace: str) -> str:
    """``query`` with ``{namespace}`` replaced."""
    return query.replace(NAMESPACE_PLACEHOLDER, namespace)


def scope_problem(query: str, namespace: str, label: str, field: str) -> str | None:
    """Why ``query`` (placeholders already replaced) may read outside ``namespace``, or
    None when every selector pins ``label="namespace"`` (or ``label`` is empty)."""
    if not label:
        return None
    try:
        expr = promql_parser.parse(query)
    except Exception as exc:  # the parser raises bare ValueError/RuntimeError kinds
        message = " ".join(str(exc).split())[:_MAX_MESSAGE]
        return f"{field}: not valid PromQL ({message})"
    problems: list[str] = []

    def visit(node: promql_parser.Expr) -> bool:
        if isinstance(node, promql_parser.Call) and node.func.name in _IMPLICIT_READS:
            problems.append(f"{field}: {node.func.name}() reads series no selector names; "
                            "select them yourself, with "
                            f'{label}="{namespace}"')
        elif isinstance(node, promql_parser.VectorSelector):
            problem = _selector_problem(node, namespace, label)
            if problem is not None:
                problems.append(f"{field}: {problem}")
        return True

    promql_parser.walk(expr, visit)
    return "; ".join(dict.fromkeys(problems)) or None


def prometheus_url_problem(url: str, label: str, field: str) -> str | None:
    """Why a tenant's query sent to ``url`` might not be the one checked (module doc), or
    None (also when ``label`` is empty: the check is off)."""
    # Either character ends the path however the rest is spelled (an empty query too).
    if label and ("?" in url or "#" in url):
        return (f"{field}: a Prometheus URL with a query string or fragment could carry a "
                "query of its own, which Prometheus would run instead: give the server's "
                "base URL only")
    return None


def _selector_problem(node: promql_parser.VectorSelector, namespace: str,
                      label: str) -> str | None:
    name = node.name or "a selector"
    if node.matchers.or_matchers:
        return (f"{name} uses `or` inside its braces; write one selector per alternative, "
                f'each with {label}="{namespace}"')
    pinned = any(m.op == promql_parser.MatchOp.Equal and m.name == label
                 and m.value == namespace for m in node.matchers.matchers)
    if pinned:
        return None
    return (f'{name} does not select {label}="{namespace}": on Kubernetes every selector '
            "of an Endpoint's PromQL must name its own namespace (write "
            f'{label}="{NAMESPACE_PLACEHOLDER}" to have it filled in)')
