"""Build the example ONNX models used by the demo, the tests and the benchmarks.

Models are built, never downloaded: a scikit-learn classifier trained on a
synthetic iris-like data set (converted with skl2onnx) and an MLP
256→512→512→10 written directly with onnx.helper (plus a small convnet,
``build_convnet``, for the compiler's tests and benchmark). Deterministic seeds make the
files reproducible, so tests can compare predictions with in-process
onnxruntime.

    python examples/build_models.py [OUT_DIR]      # default: examples/models
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np

MLP_SIZES = (256, 512, 512, 10)


def _iris_like(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = np.array([[5.0, 3.4, 1.5, 0.2], [5.9, 2.8, 4.3, 1.3], [6.6, 3.0, 5.6, 2.0]])
    x = np.concatenate([c + rng.normal(0, 0.35, size=(50, 4)) for c in centers])
    y = np.repeat(np.arange(3), 50)
    return x.astype(np.float32), y.astype(np.int64)


def build_sklearn(path: Path, *, seed: int = 0, c: float = 1.0) -> Path:
    """A LogisticRegression classifier: input ``X`` float32 [N, 4]; outputs label, probabilities."""
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    x, y = _iris_like(seed)
    clf = LogisticRegression(C=c, max_iter=500).fit(x, y)
    onx = to_onnx(clf, x[:1], options={id(clf): {"zipmap": False}}, target_opset=17)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(onx.SerializeToString())
    return path


def build_mlp(path: Path, *, seed: int = 0, sizes: tuple[int, ...] = MLP_SIZES) -> Path:
    """An MLP with ReLU: input ``input`` float32 [N, 256]; output ``logits`` [N, 10]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = "input"
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        w = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
        b = (rng.standard_normal(n_out) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        last = i == len(sizes) - 2
        mm, out = f"mm{i}", "logits" if last else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [mm]))
        if last:
            nodes.append(helper.make_node("Add", [mm, f"b{i}"], [out]))
        else:
            nodes.append(helper.make_node("Add", [mm, f"b{i}"], [f"a{i}"]))
            nodes.append(helper.make_node("Relu", [f"a{i}"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", sizes[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", sizes[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def build_convnet(path: Path, *, seed: int = 0, channels: tuple[int, int] = (16, 32),
                  size: int = 32, classes: int = 10) -> Path:
    """A small convnet: ``image`` float32 [N, 3, size, size] -> ``logits`` [N, classes].

    Conv 3x3 + ReLU, 2x2 max-pool, conv 3x3 + ReLU, global average pool, dense:
    the shape of an image classifier, small enough to compile and check in seconds.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    c1, c2 = channels

    def weight(name: str, shape: tuple[int, ...], fan_in: int) -> onnx.TensorProto:
        return numpy_helper.from_array(
            (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), name)

    inits = [
        weight("w1", (c1, 3, 3, 3), 27), numpy_helper.from_array(np.zeros(c1, np.float32), "b1"),
        weight("w2", (c2, c1, 3, 3), 9 * c1),
        numpy_helper.from_array(np.zeros(c2, np.float32), "b2"),
        weight("w3", (classes, c2), c2),
        numpy_helper.from_array((rng.standard_normal(classes) * 0.01).astype(np.float32), "b3"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "convnet",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def build_all(out_dir: Path) -> dict[str, Path]:
    return {
        "iris": build_sklearn(out_dir / "iris.onnx", seed=0, c=1.0),
        "iris-v2": build_sklearn(out_dir / "iris-v2.onnx", seed=1, c=0.1),
        "mlp": build_mlp(out_dir / "mlp.onnx"),
    }


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "models"
    for name, p in build_all(out).items():
        print(f"built {name}: {p}")
