"""Shared fixtures: a tiny random-init timm ViT saved as a weights file, and generated image folders.

Everything is CPU, offline and seeded. ``test_vit`` is timm's own 6-block test ViT (width 64); with a
4-class head it has ~0.31M parameters.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

TINY_MODEL = "test_vit"
SMALL_VIT = dict(pretrained=False, img_size=32, patch_size=8, depth=4, embed_dim=64, num_heads=2, num_classes=5)
CLASSES = ["cat", "dog", "T-shirt/top", "ship"]


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(TINY_MODEL, pretrained=False, num_classes=len(CLASSES))
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session")
def labels_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("labels") / "labels.txt"
    path.write_text("\n".join(CLASSES) + "\n")
    return path


def write_images(root: Path, per_class: dict[str, int], seed: int, size: int = 40) -> Path:
    """Random-texture PNGs in root/<folder>/<i>.png (colour mean shifted per class folder)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, (folder, n) in enumerate(per_class.items()):
        d = root / folder
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 256, (size, size, 3)).astype(np.float64)
            arr = np.clip(arr * 0.6 + 100 * (c % 3 == np.arange(3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"img_{i:03d}.png")
    return root


@pytest.fixture
def failures_dir(tmp_path) -> Path:
    return write_images(tmp_path / "failures", {"cat": 6, "dog": 6, "T-shirt_top": 6}, seed=1)


@pytest.fixture
def locality_dir(tmp_path) -> Path:
    return write_images(tmp_path / "locality", {"a": 8, "b": 8}, seed=2)


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """One intra-op thread: on a small shared CPU, 2 OpenMP threads fighting another job are ~10x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_vit(**overrides):
    """A frozen, seeded, random-init 4-block timm ViT on 32x32 inputs (8x8 patches, width 64, 5 classes)."""
    import timm
    import torch

    from vitedit.models import _freeze

    torch.manual_seed(0)
    return _freeze(timm.create_model("vit_tiny_patch16_224", **{**SMALL_VIT, **overrides}))
