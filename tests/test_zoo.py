"""The Fashion-MNIST recipe on synthetic data: IDX parsing, the withheld-cluster split, augmentation."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from vitedit.zoo import fashion


def write_idx(path, arr: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_read_idx_round_trip(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    write_idx(tmp_path / "x.gz", arr)
    np.testing.assert_array_equal(fashion.read_idx(tmp_path / "x.gz"), arr)


def _synthetic(n_per_class=60, seed=0):
    """Two visually distinct subpopulations per class: the rule must withhold one of them."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in range(10):
        for i in range(n_per_class):
            img = np.zeros((28, 28), np.uint8)
            if i % 4 == 0:  # 25%: a distinct subpopulation (bright bottom half)
                img[14:, :] = 200
            else:
                img[:14, :] = 100
            img = np.clip(img + rng.integers(0, 20, (28, 28)), 0, 255).astype(np.uint8)
            xs.append(img)
            ys.append(c)
    return {"train_x": np.stack(xs), "train_y": np.array(ys, np.uint8),
            "test_x": np.stack(xs[:: 2]), "test_y": np.array(ys[:: 2], np.uint8)}


def test_split_withholds_one_cluster_per_class_deterministically():
    data = _synthetic()
    m1 = fashion.make_split(data, clusters=2, min_share=0.1, seed=0)
    m2 = fashion.make_split(data, clusters=2, min_share=0.1, seed=0)
    assert m1 == m2
    assert len(m1["groups"]) == 10
    for g in m1["groups"]:
        tr = np.array(g["train_indices"])
        assert len(tr) > 0 and (data["train_y"][tr] == g["class_index"]).all()
        te = np.array(g["test_indices"])
        assert (data["test_y"][te] == g["class_index"]).all()
        # The withheld cluster is one subpopulation: all bright-bottom or all bright-top images.
        bottoms = data["train_x"][tr][:, 20, 5] > 150
        assert bottoms.all() or (~bottoms).all()
        assert g["cluster_share"] >= 0.1


def test_augment_keeps_shape_and_is_seeded():
    import torch

    x = torch.randn(6, 1, 28, 28)
    a = fashion.augment(x, torch.Generator().manual_seed(0))
    b = fashion.augment(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)


def test_load_fashion_reports_missing_files(tmp_path):
    with pytest.raises(SystemExit, match="dataset-fashion-mnist"):
        fashion.load_fashion(tmp_path)


def test_stage_names_and_cycle_list():
    assert fashion.stage_names(0) == [""]
    assert fashion.stage_names(2) == ["", "restart", "restart2"]
    assert fashion._int_list("4,10") == [4, 10] and fashion._int_list("") == []


def test_restart_cycles_chain_from_the_previous_stage(tmp_path, capsys):
    """Each restart cycle starts from the previous stage's weights; model.safetensors is the latest."""
    from safetensors.torch import load_file

    data = _synthetic(n_per_class=6)
    manifest = fashion.make_split(data, clusters=2, min_share=0.1, seed=0)
    common = dict(data=data, manifest=manifest, work=tmp_path, epochs=1, batch=32, resume=False, threads=1)
    fashion.train(lr=1e-3, seed=0, **common)
    fashion.train(lr=3e-4, seed=1, stage="restart", init="", **common)
    first = load_file(str(tmp_path / "model-stage1.safetensors"))
    restart = load_file(str(tmp_path / "model-restart.safetensors"))
    latest = load_file(str(tmp_path / "model.safetensors"))
    assert all((restart[k] == latest[k]).all() for k in latest)
    assert any(not (restart[k] == first[k]).all() for k in first)
    # A cycle that does no step (0 epochs) hands its starting weights on unchanged: it did start from them.
    fashion.train(lr=3e-4, seed=2, stage="restart2", init="restart", **{**common, "epochs": 0})
    again = load_file(str(tmp_path / "model-restart2.safetensors"))
    assert all((again[k] == restart[k]).all() for k in restart)
    assert "restart epoch 1/1" in capsys.readouterr().out


def test_test_images_are_exactly_the_in_distribution_test_set(tmp_path):
    from PIL import Image

    from vitedit.zoo._package import in_distribution_test, write_test_images

    data = _synthetic(n_per_class=12)
    manifest = fashion.make_split(data, clusters=2, min_share=0.1, seed=0)
    withheld = {i for g in manifest["groups"] for i in g["test_indices"]}
    idx = in_distribution_test(data, manifest)
    assert withheld and set(idx.tolist()) == set(range(len(data["test_y"]))) - withheld
    out = tmp_path / "test-images"
    (out / "stale").mkdir(parents=True)  # a previous pool is replaced, not merged
    assert write_test_images(data, manifest, out) == len(idx)
    files = sorted(out.rglob("*.png"))
    assert len(files) == len(idx) and not (out / "stale").exists()
    i = int(files[0].stem)
    assert files[0].parent.name == fashion.LABELS[int(data["test_y"][i])].replace("/", "_")
    np.testing.assert_array_equal(np.asarray(Image.open(files[0])), data["test_x"][i])
