"""Generate the example models (nothing binary is committed).

- mlp.onnx: a 3-layer MLP with a dynamic batch dimension (bound in mlci.toml).
- cnn.onnx: a small CNN whose flatten computes its Reshape target at run time
  (Shape -> Gather -> Concat -> Reshape), as torch exports do.
- squeezenet.onnx: the SqueezeNet architecture as the `onnx` package ships it
  (onnx/backend/test/data/light/light_squeezenet.onnx: real zoo layers), with seeded random
  weights in place of the file's constant ones: with constant weights every input gives the
  same 1000 scores, and a numerics check on such a model proves nothing.

Weights are seeded, so the files are byte-identical on every run: their content
hash, and so mlci's tuning cache, stays valid across machines.

Usage: python make_models.py [OUT_DIR]   (default: ./models beside this script)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # onnxruntime 1.31 refuses IR > 13; onnx 1.23 would write 14.


def _model(nodes, name, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="mlci-examples")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def mlp(hidden: int = 512, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    dims = [256, hidden, hidden, 10]
    nodes, inits, prev = [], [], "input"
    for i, (fan_in, fan_out) in enumerate(zip(dims, dims[1:])):
        w = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"fc{i}.weight"),
                  numpy_helper.from_array(np.full(fan_out, 0.01, np.float32), f"fc{i}.bias")]
        nodes.append(helper.make_node("Gemm", [prev, f"fc{i}.weight", f"fc{i}.bias"], [f"fc{i}"], name=f"fc{i}"))
        prev = f"fc{i}"
        if i < len(dims) - 2:
            nodes.append(helper.make_node("Relu", [prev], [f"relu{i}"], name=f"relu{i}"))
            prev = f"relu{i}"
    nodes.append(helper.make_node("Identity", [prev], ["logits"], name="output"))
    return _model(
        nodes, "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 256])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )


def cnn(channels: tuple[int, ...] = (16, 32, 64), seed: int = 1) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits, prev, c_in = [], [], "image", 3
    for i, c_out in enumerate(channels):
        w = (rng.standard_normal((c_out, c_in, 3, 3)) * np.sqrt(2.0 / (9 * c_in))).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"conv{i}.weight"),
                  numpy_helper.from_array(np.zeros(c_out, np.float32), f"conv{i}.bias")]
        nodes.append(helper.make_node("Conv", [prev, f"conv{i}.weight", f"conv{i}.bias"], [f"conv{i}"],
                                      name=f"conv{i}", pads=[1, 1, 1, 1], kernel_shape=[3, 3]))
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"], name=f"relu{i}"))
        prev = f"relu{i}"
        if i < len(channels) - 1:
            nodes.append(helper.make_node("MaxPool", [prev], [f"pool{i}"], name=f"pool{i}",
                                          kernel_shape=[2, 2], strides=[2, 2]))
            prev = f"pool{i}"
        c_in = c_out
    nodes.append(helper.make_node("GlobalAveragePool", [prev], ["gap"], name="gap"))
    # torch-style flatten: the Reshape target is computed from the runtime shape.
    inits += [numpy_helper.from_array(np.array(0, np.int64), "zero"),
              numpy_helper.from_array(np.array([-1], np.int64), "minus_one")]
    nodes += [
        helper.make_node("Shape", ["gap"], ["gap_shape"], name="flatten/shape"),
        helper.make_node("Gather", ["gap_shape", "zero"], ["batch"], name="flatten/gather", axis=0),
        helper.make_node("Unsqueeze", ["batch", "zero_axes"], ["batch_1d"], name="flatten/unsqueeze"),
        helper.make_node("Concat", ["batch_1d", "minus_one"], ["flat_shape"], name="flatten/concat", axis=0),
        helper.make_node("Reshape", ["gap", "flat_shape"], ["flat"], name="flatten/reshape"),
    ]
    inits.append(numpy_helper.from_array(np.array([0], np.int64), "zero_axes"))
    w = (rng.standard_normal((c_in, 10)) / np.sqrt(c_in)).astype(np.float32)
    inits += [numpy_helper.from_array(w, "fc.weight"), numpy_helper.from_array(np.zeros(10, np.float32), "fc.bias")]
    nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc"))
    return _model(
        nodes, "cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )


def zoo_model_path(name: str = "squeezenet") -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"light_{name}.onnx"


def squeezenet(seed: int = 2) -> onnx.ModelProto:
    """The `onnx` package's light SqueezeNet, its weights (built there by ConstantOfShape from
    stored shapes) replaced by He-initialised initializers, so scores depend on the image."""
    zoo = onnx.load(str(zoo_model_path()))
    stored = {t.name: numpy_helper.to_array(t) for t in zoo.graph.initializer}
    rng = np.random.default_rng(seed)
    nodes, weights = [], []
    for node in zoo.graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0].endswith("__SHAPE"):
            shape = [int(d) for d in stored[node.input[0]]]
            if len(shape) == 4:  # a convolution's weight
                values = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
            else:  # a bias
                values = np.zeros(shape)
            weights.append(numpy_helper.from_array(values.astype(np.float32), node.output[0]))
        else:
            nodes.append(node)
    replaced = {w.name for w in weights}
    others = [t for t in zoo.graph.initializer if not t.name.endswith("__SHAPE") and t.name not in replaced]
    image = [i for i in zoo.graph.input if i.name == "data_0"]
    graph = helper.make_graph(nodes, zoo.graph.name, image, list(zoo.graph.output), weights + others)
    model = helper.make_model(graph, opset_imports=list(zoo.opset_import), producer_name="mlci-examples")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def write_if_changed(path: Path, data: bytes) -> None:
    if not path.exists() or path.read_bytes() != data:
        path.write_bytes(data)


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_if_changed(out_dir / "mlp.onnx", mlp().SerializeToString())
    write_if_changed(out_dir / "cnn.onnx", cnn().SerializeToString())
    write_if_changed(out_dir / "squeezenet.onnx", squeezenet().SerializeToString())
    print(f"example models in {out_dir}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "models")
