"""Build many tiny, distinguishable ONNX models for the multi-model examples, tests, bench.

Model ``i`` computes ``y = sum(x) + i`` for an input ``x`` float32 [N, 4]
(output ``y`` float32 [N, 1]), so every answer says which model produced it.
``pad_bytes`` adds an initializer of that size to make models bigger (it is
part of the graph, so onnxruntime keeps it in memory like real weights).

    python examples/build_multimodel_models.py OUT_DIR [--count 200] [--pad-bytes 0]

writes OUT_DIR/tenant-{i}/model.onnx, ready for a multi-model prefix.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def numbered_model_bytes(i: int, pad_bytes: int = 0) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    pad = max(pad_bytes // 4, 1)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["s"]),
        # The padding takes part in the graph (times zero), so it stays loaded.
        helper.make_node("ReduceSum", ["pad"], ["p"], keepdims=0),
        helper.make_node("Mul", ["p", "zero"], ["pz"]),
        helper.make_node("Add", ["s", "b"], ["sb"]),
        helper.make_node("Add", ["sb", "pz"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.ones((4, 1), np.float32), "w"),
        numpy_helper.from_array(np.array([float(i)], np.float32), "b"),
        numpy_helper.from_array(np.full((pad,), 0.5, np.float32), "pad"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
    ]
    graph = helper.make_graph(
        nodes, f"numbered_{i}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data: bytes = model.SerializeToString()
    return data


def build(out: Path, count: int, pad_bytes: int = 0) -> list[Path]:
    paths = []
    for i in range(count):
        path = out / f"tenant-{i}" / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(numbered_model_bytes(i, pad_bytes))
        paths.append(path)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--pad-bytes", type=int, default=0)
    args = p.parse_args()
    build(args.out, args.count, args.pad_bytes)
    print(f"wrote {args.count} models under {args.out}")


if __name__ == "__main__":
    main()
