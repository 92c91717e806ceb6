"""Small models generated in code, for the demo, tests and benchmarks.

They are real ONNX graphs with deterministic weights (no download), shaped like the models users
ship: a residual CNN image classifier, a multimodal fusion model (camera + audio + IMU), a
sentence encoder with integer token inputs and dynamic dims, and an If-only model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _conv(name: str, x: str, cin: int, cout: int, rng: np.random.Generator, stride: int = 1, inits: list | None = None) -> tuple[onnx.NodeProto, str]:
    w = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))).astype(np.float32)
    b = (rng.standard_normal(cout) * 0.05).astype(np.float32)
    inits.extend([numpy_helper.from_array(w, f"{name}.weight"), numpy_helper.from_array(b, f"{name}.bias")])
    node = helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [f"{name}.out"], name=name,
                            kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[stride, stride])
    return node, f"{name}.out"


def _bn(name: str, x: str, c: int, rng: np.random.Generator, inits: list) -> tuple[onnx.NodeProto, str]:
    params = {
        "scale": (1 + 0.1 * rng.standard_normal(c)).astype(np.float32),
        "bias": (0.1 * rng.standard_normal(c)).astype(np.float32),
        "mean": (0.1 * rng.standard_normal(c)).astype(np.float32),
        "var": (1 + 0.1 * rng.random(c)).astype(np.float32),
    }
    inits.extend(numpy_helper.from_array(v, f"{name}.{k}") for k, v in params.items())
    node = helper.make_node("BatchNormalization", [x] + [f"{name}.{k}" for k in params], [f"{name}.out"], name=name)
    return node, f"{name}.out"


def _relu(name: str, x: str) -> tuple[onnx.NodeProto, str]:
    return helper.make_node("Relu", [x], [f"{name}.out"], name=name), f"{name}.out"


def make_cnn(seed: int = 0, width: int = 32, classes: int = 10, size: int = 32, batch: int | str = 1) -> onnx.ModelProto:
    """A residual CNN classifier: input ``image`` [batch,3,size,size] NCHW → ``logits`` [batch,classes]."""
    rng = np.random.default_rng(seed)
    inits: list = []
    nodes = []

    def add(pair):
        node, out = pair
        nodes.append(node)
        return out

    x = add(_conv("stem", "image", 3, width // 2, rng, inits=inits))
    x = add(_bn("stem_bn", x, width // 2, rng, inits))
    x = add(_relu("stem_relu", x))
    x = add(_conv("down", x, width // 2, width, rng, stride=2, inits=inits))
    x = add(_relu("down_relu", x))
    skip = x
    y = add(_conv("block_a", x, width, width, rng, inits=inits))
    y = add(_bn("block_a_bn", y, width, rng, inits))
    y = add(_relu("block_a_relu", y))
    y = add(_conv("block_b", y, width, width, rng, inits=inits))
    nodes.append(helper.make_node("Add", [y, skip], ["residual.out"], name="residual"))
    x = add(_relu("residual_relu", "residual.out"))
    x = add(_conv("head_conv", x, width, width * 2, rng, stride=2, inits=inits))
    x = add(_relu("head_relu", x))
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool.out"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pool.out"], ["flat.out"], name="flatten", axis=1))
    w = (rng.standard_normal((classes, width * 2)) * np.sqrt(1.0 / (width * 2))).astype(np.float32)
    inits += [numpy_helper.from_array(w, "fc.weight"), numpy_helper.from_array(np.zeros(classes, np.float32), "fc.bias")]
    nodes.append(helper.make_node("Gemm", ["flat.out", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(
        nodes, "edge_sdk_sample_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edge-sdk-samples")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def make_multimodal(seed: int = 0, image_size: int = 32, audio_window: int = 4, audio_features: int = 40, imu_dim: int = 6, classes: int = 5) -> onnx.ModelProto:
    """A fusion model: ``image`` [1,3,H,W] + ``audio`` [1,window,features] + ``imu`` [1,imu_dim] → ``scores``."""
    rng = np.random.default_rng(seed)
    inits: list = []
    nodes = []
    node, x = _conv("img_conv", "image", 3, 8, rng, stride=2, inits=inits)
    nodes.append(node)
    node, x = _relu("img_relu", x)
    nodes.append(node)
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["img_pool"], name="img_pool"))
    nodes.append(helper.make_node("Flatten", ["img_pool"], ["img_feat"], name="img_flat", axis=1))
    nodes.append(helper.make_node("ReduceMean", ["audio"], ["audio_mean"], name="audio_mean", axes=[1], keepdims=0))
    nodes.append(helper.make_node("Concat", ["img_feat", "audio_mean", "imu"], ["fused"], name="fuse", axis=1))
    fused = 8 + audio_features + imu_dim
    w1 = (rng.standard_normal((fused, 32)) * np.sqrt(2.0 / fused)).astype(np.float32)
    w2 = (rng.standard_normal((32, classes)) * np.sqrt(1.0 / 32)).astype(np.float32)
    inits += [numpy_helper.from_array(w1, "fc1.weight"), numpy_helper.from_array(np.zeros(32, np.float32), "fc1.bias"),
              numpy_helper.from_array(w2, "fc2.weight"), numpy_helper.from_array(np.zeros(classes, np.float32), "fc2.bias")]
    nodes.append(helper.make_node("Gemm", ["fused", "fc1.weight", "fc1.bias"], ["h1"], name="fc1"))
    nodes.append(helper.make_node("Relu", ["h1"], ["h1r"], name="fc1_relu"))
    nodes.append(helper.make_node("Gemm", ["h1r", "fc2.weight", "fc2.bias"], ["scores"], name="fc2"))
    # ReduceMean takes axes as an attribute up to opset 17.
    graph = helper.make_graph(
        nodes, "edge_sdk_sample_multimodal",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, image_size, image_size]),
         helper.make_tensor_value_info("audio", TensorProto.FLOAT, [1, audio_window, audio_features]),
         helper.make_tensor_value_info("imu", TensorProto.FLOAT, [1, imu_dim])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edge-sdk-samples")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def make_if_model(seed: int = 0) -> onnx.ModelProto:
    """All compute inside ``If`` branches (inputs ``x`` [1, 4] and ``cond``): quantizers skip
    subgraphs, so an "INT8" build of it comes out unquantized."""
    w = numpy_helper.from_array(np.random.default_rng(seed).standard_normal((4, 4)).astype(np.float32), "w")

    def branch(name: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node("MatMul", ["x", "w"], [f"{name}_y"], name=f"{name}_mm")], name, [],
                                 [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [1, 4])])

    # The condition is an input: a constant one would let the optimizer fold the If away.
    node = helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=branch("then"), else_branch=branch("else"))
    graph = helper.make_graph([node], "ifmodel", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
                                                  helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def make_token_model(seed: int = 0, vocab: int = 64, width: int = 32, out: int = 16) -> onnx.ModelProto:
    """A tiny sentence encoder: int64 ``input_ids`` and ``attention_mask`` [batch, seq] (both dims
    symbolic, as exporters write them) -> embedding lookup -> masked 2-layer MLP -> mean over the
    sequence -> ``sentence_embedding`` [batch, out]. Integer inputs, dynamic dims, MatMul weights."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((vocab, width)).astype(np.float32), "embeddings"),
             numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal((width, out)) / np.sqrt(width)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array([-1], np.int64), "last_axis")]
    nodes = [
        helper.make_node("Gather", ["embeddings", "input_ids"], ["tokens"], name="lookup"),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], name="mask_cast", to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "last_axis"], ["mask3"], name="mask_unsqueeze"),
        helper.make_node("MatMul", ["tokens", "w1"], ["h1"], name="mlp1"),
        helper.make_node("Relu", ["h1"], ["a1"], name="act1"),
        helper.make_node("MatMul", ["a1", "w2"], ["h2"], name="mlp2"),
        helper.make_node("Mul", ["h2", "mask3"], ["masked"], name="apply_mask"),
        helper.make_node("ReduceMean", ["masked"], ["sentence_embedding"], name="mean_pool", axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(nodes, "token_encoder", [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
    ], [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", out])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def make_mlp(seed: int = 0, width: int = 2048, layers: int = 7, features: int = 256, classes: int = 16) -> onnx.ModelProto:
    """A wide MLP whose size is nearly all MatMul weights: input ``x`` [1,features] → ``logits`` [1,classes].

    The defaults give ~98 MB of FP32 weights: big enough that each variant's memory footprint
    (pre-packed copies, FP16 casts, INT8 tables) stands out of the interpreter's own RSS.
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x, dims = "x", [features] + [width] * layers + [classes]
    for i, (cin, cout) in enumerate(zip(dims, dims[1:])):
        w = (rng.standard_normal((cin, cout)) * np.sqrt(2.0 / cin)).astype(np.float32)
        b = (rng.standard_normal(cout) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"fc{i}.weight"), numpy_helper.from_array(b, f"fc{i}.bias")]
        nodes.append(helper.make_node("MatMul", [x, f"fc{i}.weight"], [f"mm{i}"]))
        out = "logits" if i == len(dims) - 2 else f"add{i}"
        nodes.append(helper.make_node("Add", [f"mm{i}", f"fc{i}.bias"], [out]))
        if out != "logits":
            nodes.append(helper.make_node("Relu", [out], [f"relu{i}"]))
            out = f"relu{i}"
        x = out
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, features])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


def with_new_last_layer(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """A copy of a :func:`make_cnn` model whose final ``fc.weight`` is re-drawn: an update that
    touches one layer (what incremental sync should move cheaply)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for i, init in enumerate(model.graph.initializer):
        if init.name == "fc.weight":
            w = numpy_helper.to_array(init)
            new = (np.random.default_rng(seed).standard_normal(w.shape) * w.std()).astype(np.float32)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(new, "fc.weight"))
    return model


def save(model: onnx.ModelProto, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
