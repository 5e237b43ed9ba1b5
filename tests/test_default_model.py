"""The embedded default model and its bundled data (vitedit/assets/fashion), offline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vitedit.models import DEFAULT_ASSETS, DEFAULT_MODEL, load_model
from vitedit.zoo.fashion import LABELS, MEAN, STD

META = json.loads((DEFAULT_ASSETS / "model.json").read_text())


@pytest.fixture(scope="module")
def default():
    torch.set_num_threads(1)
    return load_model(None)


def test_default_model_identity_labels_and_preprocessing(default):
    assert default.name == DEFAULT_MODEL
    assert default.labels == list(LABELS)
    assert tuple(default.data_config["input_size"]) == (1, 28, 28)
    assert tuple(default.data_config["mean"]) == MEAN and tuple(default.data_config["std"]) == STD
    assert default.sites() and {s.block for s in default.sites()} == {1, 2, 3}


def test_bundled_png_preprocesses_like_training(default):
    """A bundled PNG through the model's transform equals (pixels/255 - mean)/std, as in training."""
    from PIL import Image

    from vitedit.data import open_image

    png = next((DEFAULT_ASSETS / "test").rglob("*.png"))
    x = default.transform(open_image(png, default.channels))
    raw = np.asarray(Image.open(png), dtype=np.float32) / 255.0
    expected = (torch.from_numpy(raw)[None] - MEAN[0]) / STD[0]
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)


def test_recorded_figures_match_the_shipped_model(default):
    """The in-distribution accuracy recorded in model.json holds on the shipped test sample (+/- 3 points)."""
    from vitedit.data import load_tensors, scan_labeled

    refs = scan_labeled(DEFAULT_ASSETS / "test", default.labels)
    x, good, _ = load_tensors(refs, default.transform, default.channels)
    y = torch.tensor([r.label for r in good])
    with torch.inference_mode():
        acc = float((default.model(x).argmax(-1) == y).float().mean())
    assert abs(acc - META["figures"]["in_distribution_test_accuracy"]) < 0.03


def test_bundled_failures_are_failures_and_sensitive_set_is_fragile(default):
    from vitedit.data import load_tensors, scan_labeled
    from vitedit.demo import examples

    groups = examples()
    assert len(groups) >= 5
    g = groups[0]
    refs = scan_labeled(DEFAULT_ASSETS / "failures" / g["group"], default.labels)
    x, good, _ = load_tensors(refs, default.transform, default.channels)
    y = torch.tensor([r.label for r in good])
    with torch.inference_mode():
        assert (default.model(x).argmax(-1) != y).all()
    srefs = scan_labeled(DEFAULT_ASSETS / "sensitive", default.labels)
    sx, sgood, _ = load_tensors(srefs, default.transform, default.channels)
    sy = torch.tensor([r.label for r in sgood])
    with torch.inference_mode():
        p = torch.softmax(default.model(sx), -1)
    top2 = p.topk(2, -1).values
    assert (p.argmax(-1) == sy).all() and ((top2[:, 0] - top2[:, 1]) < 0.05).all()


def test_export_base_default_has_preprocessing_metadata(tmp_path, monkeypatch):
    from vitedit.cli import main
    from vitedit.export import read_metadata

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["export", "base.onnx", "--base", "--json", "--quiet"])
    assert e.value.code == 0
    meta = read_metadata(tmp_path / "base.onnx")
    assert json.loads(meta["vitedit.labels"]) == list(LABELS)
    assert json.loads(meta["vitedit.mean"]) == pytest.approx(list(MEAN))
    assert json.loads(meta["vitedit.std"]) == pytest.approx(list(STD))
    assert meta["vitedit.channels"] == "1" and meta["vitedit.input_size"].replace(" ", "") in ("1,28,28", "[1,28,28]")
    assert meta["vitedit.edited"] == "false"


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, monkeypatch, capsys):
    """`vitedit demo --json`: the whole job on the smallest bundled group, with a real edit and export."""
    from vitedit.cli import main
    from vitedit.demo import examples

    monkeypatch.chdir(tmp_path)
    group = min(examples(), key=lambda g: g["failures"])["group"]
    with pytest.raises(SystemExit) as e:
        main(["demo", "--group", group, "--edit-images", "3", "--sparsities", "0.05", "--preserve-weights", "3",
              "--json", "--quiet"])
    assert e.value.code == 0
    res = json.loads(capsys.readouterr().out)
    assert res["apply"]["success"] == 1.0
    assert 0.0 <= res["apply"]["locality"] <= 1.0 and res["apply"]["locality_images"] > 0
    assert res["export"]["top1_agreement"] == 1.0 and res["export"]["max_abs_diff"] <= 1e-4
    assert {p["locator"] for p in res["report"]["points"]} >= {"random"}
    assert (tmp_path / "vitedit-demo" / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the local editor with the bundled preserve and check sets, and the HTML page of the edit
    assert res["apply"]["objective"] == "local" and res["apply"]["preserve_images"] == 2000
    assert res["apply"]["check_images"] == 1000 and res["apply"]["accuracy_drop"] is not None
    page = (tmp_path / "vitedit-demo" / "report.html").read_text()
    assert res["report"]["html"].endswith("report.html") and page.count('class="thumb"') >= res["apply"]["edit_images"]


def test_the_bundled_preserve_set_shares_no_image_with_any_measured_set():
    """The preserve set is fitted on, never measured: no shipped test, sensitive or failure PNG may equal one."""
    import hashlib

    from vitedit.models import DEFAULT_ASSETS

    assert (DEFAULT_ASSETS / "preserve").is_dir(), "the bundled preserve set is part of the package"

    def digests(folder):
        return {hashlib.sha256(p.read_bytes()).hexdigest() for p in (DEFAULT_ASSETS / folder).rglob("*.png")}

    preserve = digests("preserve")
    assert len(preserve) == 2000
    for folder in ("test", "sensitive", "failures"):
        assert not preserve & digests(folder), folder
