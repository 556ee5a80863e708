"""Can TVM import this ONNX model? Decided from the op list alone, before trying.

TVM's ONNX frontend converts the default domain's operators only, and not all
of them: none of scikit-learn's ``ai.onnx.ml`` ops (skl2onnx models), no
recurrent or control-flow ops (LSTM, GRU, RNN, Loop, Scan), no QLinear*
quantized ops. Trying the import anyway ends deep in the frontend with a
message about one op; checking first names every offending op at once, and the
model still gets the onnxruntime candidates. Pure: the caller lists the nodes
(subgraphs included) and, when TVM is importable, passes the frontend's
supported set.
"""

from __future__ import annotations

from collections.abc import Iterable

#: Domains TVM's frontend reads ("" is the default ONNX domain).
TVM_DOMAINS = frozenset({"", "ai.onnx"})
#: Default-domain ops known not to import, even where a frontend lists a name.
UNSUPPORTED_OPS = frozenset({"LSTM", "GRU", "RNN", "Loop", "Scan"})


def op_label(domain: str, op_type: str) -> str:
    return op_type if domain in TVM_DOMAINS else f"{domain}:{op_type}"


def unsupported_ops(nodes: Iterable[tuple[str, str]],
                    supported: frozenset[str] | None = None) -> list[str]:
    """The ops (``domain:Op`` outside the default domain) TVM cannot import, sorted, once each.

    ``nodes`` are (domain, op_type) pairs; ``supported`` is the frontend's op set
    (None: only the fixed rules apply).
    """
    bad: set[str] = set()
    for domain, op in nodes:
        if domain not in TVM_DOMAINS or op in UNSUPPORTED_OPS or op.startswith("QLinear"):
            bad.add(op_label(domain, op))
        elif supported is not None and op not in supported:
            bad.add(op)
    return sorted(bad)


def import_problem(ops: list[str]) -> str:
    """The report's wording, e.g. ``not compilable with TVM: ops ai.onnx.ml:LinearClassifier``."""
    shown = ", ".join(ops[:10]) + (f" and {len(ops) - 10} more" if len(ops) > 10 else "")
    return f"not compilable with TVM: ops {shown}" if ops else ""
