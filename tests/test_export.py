"""Tests for vitedit.export: single-file ONNX, checked by onnx.checker and matched against PyTorch.

Tiny random-init timm ViTs (seeded), CPU, offline. Each real export takes ~2-3 s, so the two
successful exports are module-scoped and shared; failure paths are simulated through the
``_onnxruntime_logits`` seam or by replacing an exporter.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vitedit import export as export_mod
from vitedit.errors import ArtifactError, InputDataError, ModelError, UsageError, VerificationError
from vitedit.export import ExportConfig, export_onnx, preprocessing_metadata, read_metadata

RGB_LABELS = ["cat", "dog", "T-shirt/top", "ship", "naïve café"]  # a slash and non-ASCII on purpose
GRAY_LABELS = [f"class {i}" for i in range(10)]
ATOL = 1e-4


def rgb_vit() -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             embed_dim=64, num_heads=2, num_classes=len(RGB_LABELS)).eval()


def gray_vit() -> torch.nn.Module:
    import timm

    torch.manual_seed(1)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, depth=2,
                             embed_dim=64, num_heads=2, num_classes=len(GRAY_LABELS), in_chans=1).eval()


RGB_CONFIG = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5),
              "std": (0.5, 0.5, 0.5), "crop_pct": 0.9, "crop_mode": "center"}
# Fashion-MNIST statistics, as the project's default model uses them.
GRAY_CONFIG = {"input_size": (1, 28, 28), "interpolation": "bilinear", "mean": (0.286,), "std": (0.353,),
               "crop_pct": 1.0, "crop_mode": "center"}


def images(n: int, channels: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def ort_logits(path: Path, batch: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"pixel_values": batch.numpy()})[0]


@pytest.fixture(scope="module")
def rgb_export(tmp_path_factory):
    """One image only: export must repeat it to trace a dynamic batch and check a batch of 2."""
    model = rgb_vit()
    before = snapshot(model)
    out = tmp_path_factory.mktemp("rgb") / "model.onnx"
    messages: list[str] = []
    meta = preprocessing_metadata(RGB_CONFIG, RGB_LABELS, 3,
                                  {"model": "vit_tiny_patch16_224", "edited": True, "patch_sha256": "ab" * 32})
    result = export_onnx(model, out, images(1, 3, 32, seed=10), metadata=meta, progress=messages.append)
    return model, before, result, meta, messages


@pytest.fixture(scope="module")
def gray_export(tmp_path_factory):
    model = gray_vit()
    out = tmp_path_factory.mktemp("gray") / "fmnist.onnx"
    meta = preprocessing_metadata(GRAY_CONFIG, GRAY_LABELS, 1, {"edited": False})
    result = export_onnx(model, out, images(4, 1, 28, seed=11), metadata=meta,
                         config=ExportConfig(opset=18, atol=ATOL))
    return model, result, meta


# --- the exported file --------------------------------------------------------------------------


def test_export_writes_one_self_contained_file(rgb_export):
    import onnx

    _, _, result, _, _ = rgb_export
    assert result.path.is_file()
    assert [p.name for p in result.path.parent.iterdir()] == [result.path.name]  # no .data, no temp files
    proto = onnx.load(str(result.path), load_external_data=False)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    onnx.checker.check_model(str(result.path), full_check=True)


def test_export_result_reports_dynamo_and_opset(rgb_export):
    import onnx

    _, _, result, _, messages = rgb_export
    assert result.ok and result.exporter == "dynamo" and result.fallback_reason == ""
    assert result.opset == 18
    proto = onnx.load(str(result.path), load_external_data=False)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [18]
    assert result.num_checked == 1
    assert result.top1_agreement == 1.0
    assert 0.0 <= result.max_abs_diff <= ATOL
    assert any("dynamo" in m for m in messages) and any("onnxruntime" in m for m in messages)


def test_graph_has_named_io_and_symbolic_batch(rgb_export):
    import onnx

    _, _, result, _, _ = rgb_export
    graph = onnx.load(str(result.path), load_external_data=False).graph
    (inp,), (out,) = graph.input, graph.output
    assert (inp.name, out.name) == ("pixel_values", "logits")
    in_dims = inp.type.tensor_type.shape.dim
    assert in_dims[0].dim_param and not in_dims[0].dim_value  # symbolic, not a fixed size
    assert [d.dim_value for d in in_dims[1:]] == [3, 32, 32]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_onnxruntime_matches_pytorch_at_any_batch(rgb_export, batch):
    model, _, result, _, _ = rgb_export
    x = images(batch, 3, 32, seed=100 + batch)
    with torch.no_grad():
        expected = model(x)
    got = torch.from_numpy(ort_logits(result.path, x))
    assert got.shape == (batch, len(RGB_LABELS))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_callers_model_is_untouched(rgb_export):
    model, before, _, _, _ = rgb_export
    assert_same_state(model, before)
    assert not model.training
    assert all(p.requires_grad for p in model.parameters())


def test_metadata_round_trips(rgb_export):
    _, _, result, meta, _ = rgb_export
    stored = read_metadata(result.path)
    assert {k: stored[k] for k in meta} == meta
    assert json.loads(stored["vitedit.labels"]) == RGB_LABELS
    assert json.loads(stored["vitedit.mean"]) == [0.5, 0.5, 0.5]
    assert json.loads(stored["vitedit.std"]) == [0.5, 0.5, 0.5]
    assert stored["vitedit.input_size"] == "3,32,32"
    assert stored["vitedit.edited"] == "true"
    assert stored["vitedit.model"] == "vit_tiny_patch16_224"
    assert stored["vitedit.patch_sha256"] == "ab" * 32


def test_one_channel_export_matches_and_describes_its_preprocessing(gray_export):
    model, result, _ = gray_export
    assert result.ok and result.num_checked == 4 and result.top1_agreement == 1.0
    x = images(3, 1, 28, seed=7)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(torch.from_numpy(ort_logits(result.path, x)), expected, atol=ATOL, rtol=0)
    stored = read_metadata(result.path)
    assert stored["vitedit.input_size"] == "1,28,28"
    assert stored["vitedit.channels"] == "1"
    assert json.loads(stored["vitedit.labels"]) == GRAY_LABELS
    assert stored["vitedit.edited"] == "false"
    assert stored["vitedit.preprocessing"] == (
        "convert to L (1 channel), resize shorter side to 28 with bilinear, center-crop 28x28, "
        "scale to [0,1], subtract mean [0.286] and divide by std [0.353]")


def test_export_prints_nothing(tmp_path, capfd):
    model = gray_vit()
    meta = preprocessing_metadata(GRAY_CONFIG, GRAY_LABELS, 1)
    capfd.readouterr()
    export_onnx(model, tmp_path / "m.onnx", images(2, 1, 28, seed=3), metadata=meta,
                config=ExportConfig(dynamic_batch=False))
    captured = capfd.readouterr()
    assert captured.out == ""


# --- failures never replace a good file ---------------------------------------------------------


def shifted_logits(session, batch):
    """onnxruntime's logits plus 1: same top-1 class, but far outside any tolerance."""
    return session.run(["logits"], {"pixel_values": batch})[0] + 1.0


def reversed_logits(session, batch):
    """onnxruntime's logits with the classes reversed: top-1 disagrees."""
    return session.run(["logits"], {"pixel_values": batch})[0][:, ::-1]


def test_failed_verification_keeps_existing_output(rgb_export, tmp_path, monkeypatch):
    _, _, good, _, _ = rgb_export
    out = tmp_path / "model.onnx"
    out.write_bytes(good.path.read_bytes())
    before = out.read_bytes()
    model = rgb_vit()
    state = snapshot(model)

    monkeypatch.setattr(export_mod, "_onnxruntime_logits", shifted_logits)
    with pytest.raises(VerificationError) as info:
        export_onnx(model, out, images(2, 3, 32, seed=4), metadata=read_metadata(good.path))

    message = str(info.value)
    assert info.value.exit_code == 7
    assert "--atol 0.0001" in message and "max abs logit difference 1" in message
    assert "model.failed.onnx" in message and "\n" not in message
    assert out.read_bytes() == before  # the good file is untouched
    failed = tmp_path / "model.failed.onnx"
    assert failed.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.failed.onnx", "model.onnx"]  # no temp left
    assert_same_state(model, state)
    assert not model.training


def test_top1_disagreement_fails_even_within_tolerance(tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "_onnxruntime_logits", reversed_logits)
    out = tmp_path / "model.onnx"
    with pytest.raises(VerificationError, match=r"top-1 agreement 0\.0%"):
        export_onnx(rgb_vit(), out, images(2, 3, 32, seed=5), metadata={},
                    config=ExportConfig(atol=1e6))
    assert not out.exists()
    assert (tmp_path / "model.failed.onnx").is_file()


# --- exporter fallback and opsets ---------------------------------------------------------------


def test_falls_back_to_torchscript_and_says_why(tmp_path, monkeypatch, capfd):
    def broken_dynamo(*args, **kwargs):
        raise RuntimeError("simulated dynamo failure\nwith a second line")

    monkeypatch.setattr(export_mod, "_export_dynamo", broken_dynamo)
    model = rgb_vit().train()  # a model in train mode is exported in eval mode and given back in train mode
    model.blocks[0].eval()
    state = snapshot(model)
    capfd.readouterr()
    result = export_onnx(model, tmp_path / "m.onnx", images(3, 3, 32, seed=6), metadata={})
    assert capfd.readouterr().out == ""  # the TorchScript exporter's C++ logging never reaches stdout
    if hasattr(torch._C, "_jit_is_onnx_log_enabled"):  # torch leaves it on after an export; we restore it
        assert not torch._C._jit_is_onnx_log_enabled()
    assert result.ok and result.exporter == "torchscript"
    assert result.fallback_reason == "dynamo: RuntimeError: simulated dynamo failure"
    assert model.training and not model.blocks[0].training and model.blocks[1].training
    assert_same_state(model, state)
    model.eval()
    x = images(5, 3, 32, seed=8)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(ort_logits(result.path, x)), model(x), atol=ATOL, rtol=0)


def test_unreachable_opset_is_a_usage_error(tmp_path, monkeypatch):
    # Both exporters "produce" another opset than asked for (as dynamo does below opset 18).
    monkeypatch.setattr(export_mod, "_default_opset", lambda proto: 18)
    with pytest.raises(UsageError, match=r"--opset 20 cannot be produced"):
        export_onnx(rgb_vit(), tmp_path / "m.onnx", images(2, 3, 32, seed=9), metadata={},
                    config=ExportConfig(opset=20))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("opset", [12, 0, -1, "18", 18.0, True, None])
def test_opset_outside_range_is_a_usage_error(opset):
    with pytest.raises(UsageError, match="--opset"):
        ExportConfig(opset=opset)


def test_opset_above_what_onnx_knows_is_a_usage_error():
    import onnx

    highest = onnx.defs.onnx_opset_version()
    assert ExportConfig(opset=highest).opset == highest
    with pytest.raises(UsageError, match=f"--opset {highest + 1} .* from 13 to {highest}"):
        ExportConfig(opset=highest + 1)


@pytest.mark.parametrize("atol", [-1.0, float("nan"), float("inf"), "1e-4"])
def test_bad_atol_is_a_usage_error(atol):
    with pytest.raises(UsageError, match="--atol"):
        ExportConfig(atol=atol)


# --- inputs checked before any work ------------------------------------------------------------


def test_example_must_be_an_image_batch(tmp_path):
    for bad in (torch.zeros(3, 32, 32), torch.zeros(0, 3, 32, 32), torch.zeros(1, 3, 32, 32, dtype=torch.uint8)):
        with pytest.raises(InputDataError):
            export_onnx(rgb_vit(), tmp_path / "m.onnx", bad, metadata={})
    assert list(tmp_path.iterdir()) == []


def test_metadata_must_describe_the_graph(tmp_path):
    meta = preprocessing_metadata(GRAY_CONFIG, GRAY_LABELS, 1)
    with pytest.raises(ModelError, match="input size 1,28,28"):
        export_onnx(rgb_vit(), tmp_path / "m.onnx", images(1, 3, 32, seed=0), metadata=meta)
    wrong_labels = preprocessing_metadata(RGB_CONFIG, RGB_LABELS[:2], 3)
    with pytest.raises(ModelError, match="2 class names but the model has 5 outputs"):
        export_onnx(rgb_vit(), tmp_path / "m.onnx", images(1, 3, 32, seed=0), metadata=wrong_labels)
    with pytest.raises(TypeError, match="must be str"):
        export_onnx(rgb_vit(), tmp_path / "m.onnx", images(1, 3, 32, seed=0), metadata={"vitedit.x": 1})
    assert list(tmp_path.iterdir()) == []


# --- metadata helpers ---------------------------------------------------------------------------


def test_preprocessing_metadata_fields():
    from vitedit import __version__

    meta = preprocessing_metadata(RGB_CONFIG, RGB_LABELS, 3, {"vitedit.model": "m", "blocks": [1, 2]})
    assert meta["vitedit.version"] == __version__
    assert meta["vitedit.interpolation"] == "bicubic"
    assert meta["vitedit.crop_pct"] == "0.9"
    assert meta["vitedit.crop_mode"] == "center"
    assert meta["vitedit.model"] == "m"
    assert json.loads(meta["vitedit.blocks"]) == [1, 2]
    # floor(32 / 0.9) = 35, as timm's eval transform computes it
    assert "resize shorter side to 35 with bicubic, center-crop 32x32" in meta["vitedit.preprocessing"]
    assert meta["vitedit.preprocessing"].startswith("convert to RGB (3 channels)")
    assert all(isinstance(v, str) for v in meta.values())


def test_preprocessing_metadata_refuses_mismatched_channels():
    with pytest.raises(ModelError, match="3 input channels but the model takes 1"):
        preprocessing_metadata(RGB_CONFIG, GRAY_LABELS, 1)
    with pytest.raises(ModelError, match="3 mean"):
        preprocessing_metadata({**RGB_CONFIG, "input_size": (1, 32, 32)}, GRAY_LABELS, 1)


def test_read_metadata_errors(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        read_metadata(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff\x00 not a protobuf \x12\x34" * 10)
    with pytest.raises(ArtifactError, match="not a readable ONNX file"):
        read_metadata(junk)


# --- export to a timm folder (`vitedit export DIR --format timm`) --------------------------------


@pytest.fixture(scope="module")
def edited_workspace(tmp_path_factory, tiny_weights, labels_file):
    """locate -> apply on timm's test_vit (random locator, a few steps): a workspace with a real patch."""
    from conftest import write_images

    from vitedit.pipeline import ApplyConfig, ExperimentOptions, LocateConfig, ModelOptions, run_apply, run_locate

    root = tmp_path_factory.mktemp("timm-export")
    failures = write_images(root / "failures", {"cat": 4, "dog": 4, "ship": 4}, seed=3)
    ws = root / "ws"
    run_locate(LocateConfig(failures, ModelOptions("test_vit", tiny_weights, labels_file, "cpu"), locator="random",
                            workspace=ws))
    run_apply(ApplyConfig(ws, 0.25, ExperimentOptions({"lr": 1e-3, "max_steps": 3}, device="cpu")))
    return ws


def test_timm_folder_loads_back_as_the_edited_model(edited_workspace, tmp_path, tiny_weights, labels_file):
    import timm
    from timm.data import resolve_model_data_config

    from conftest import CLASSES
    from vitedit.models import load_model
    from vitedit.pipeline import ExportJob, run_export

    out = tmp_path / "edited-timm"
    res = run_export(ExportJob(out, edited_workspace, format="timm"))
    assert res["format"] == "timm" and res["base"] is False and Path(res["path"]) == out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "vitedit.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited-timm"]  # no temp folder left
    assert res["max_abs_diff"] == 0.0 and res["top1_agreement"] == 1.0 and res["num_checked"] > 0

    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    edited = load_model("test_vit", weights=edited_workspace / "edited.safetensors", labels_file=labels_file)
    base = load_model("test_vit", weights=tiny_weights, labels_file=labels_file)
    x = images(4, 3, 160, seed=20)
    with torch.no_grad():
        got, want = reloaded(x), edited.model(x)
        assert torch.equal(got, want)
        assert not torch.equal(got, base.model(x))  # it is the edited model, not the base one
    assert reloaded.pretrained_cfg["label_names"] == CLASSES
    data = resolve_model_data_config(reloaded)
    for key in ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode"):
        assert tuple(np.atleast_1d(data[key])) == tuple(np.atleast_1d(edited.data_config[key])), key

    prov = json.loads((out / "vitedit.json").read_text())
    patch_meta = json.loads((edited_workspace / "patch.json").read_text())
    assert prov["edited"] is True and prov["model"] == "test_vit" and prov["sparsity"] == 0.25
    assert prov["patch_sha256"] == patch_meta["sha256"]
    assert prov["base_weights_sha256"] == base.weights_sha256


def test_timm_folder_of_the_embedded_default_keeps_its_constructor_args_and_preprocessing(tmp_path):
    import timm
    from timm.data import resolve_model_data_config

    from vitedit.models import DEFAULT_ASSETS, load_model
    from vitedit.pipeline import ExportJob, run_export

    res = run_export(ExportJob(tmp_path / "fashion", base=True, format="timm", workspace=tmp_path / "no-ws"))
    assert res["base"] is True and res["num_checked"] == 53 and res["max_abs_diff"] == 0.0  # the bundled set
    config = json.loads((tmp_path / "fashion" / "config.json").read_text())
    meta = json.loads((DEFAULT_ASSETS / "model.json").read_text())
    assert config["architecture"] == meta["architecture"]
    args = {**meta["model_kwargs"], "img_size": [28, 28]}
    assert {k: config["model_args"][k] for k in args} == args
    assert "tag" not in config["pretrained_cfg"]  # vit_tiny_patch16_224's default tag does not describe these weights

    reloaded = timm.create_model(f"local-dir:{tmp_path / 'fashion'}", pretrained=True).eval()
    default = load_model(None)
    assert reloaded.pretrained_cfg["label_names"] == default.labels == meta["labels"]
    data = resolve_model_data_config(reloaded)
    assert tuple(data["input_size"]) == (1, 28, 28)
    assert list(data["mean"]) == [0.286] and list(data["std"]) == [0.353]
    x = images(3, 1, 28, seed=21)
    with torch.no_grad():
        assert torch.equal(reloaded(x), default.model(x))


def test_timm_export_replaces_its_own_folder_and_never_a_foreign_one(tmp_path):
    from vitedit.pipeline import ExportJob, run_export

    out = tmp_path / "m"
    job = ExportJob(out, base=True, format="timm", workspace=tmp_path / "no-ws", max_images=4)
    run_export(job)
    (out / "model.safetensors").write_bytes(b"stale")
    run_export(job)  # a previous vitedit timm export is replaced
    assert (out / "model.safetensors").stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="not empty and not a vitedit timm export"):
        run_export(ExportJob(foreign, base=True, format="timm", workspace=tmp_path / "no-ws"))
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        run_export(ExportJob(tmp_path / "file", base=True, format="timm", workspace=tmp_path / "no-ws"))
    with pytest.raises(UsageError, match="--format 'tflite': choose onnx or timm"):
        ExportJob(out, format="tflite")


def test_a_timm_folder_that_does_not_reload_identically_is_never_put_in_place(tmp_path, monkeypatch):
    from vitedit import timm_export
    from vitedit.pipeline import ExportJob, run_export

    real = timm_export._write_folder

    def corrupting(model, folder, *args):
        real(model, folder, *args)
        from safetensors.torch import load_file, save_file

        state = load_file(str(folder / "model.safetensors"))
        state["head.bias"] = state["head.bias"] + 1.0
        save_file(state, str(folder / "model.safetensors"))

    monkeypatch.setattr(timm_export, "_write_folder", corrupting)
    with pytest.raises(VerificationError, match="bit-identical"):
        run_export(ExportJob(tmp_path / "m", base=True, format="timm", workspace=tmp_path / "no-ws", max_images=4))
    assert list(tmp_path.iterdir()) == []
