"""Meta-training: the vectorized step equals the per-sample procedure; CutMix stays on the patch grid;
checkpoints resume; two torchrun ranks end with identical hypernetworks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import small_vit as make_small_vit
from vitedit.errors import UsageError
from vitedit.metatrain import (BatchedEditor, MetaTrainConfig, cutmix, global_shift, kl_per_sample, label_masks,
                               label_masks_loop, patch_grid, pick_partners, pseudo_failures)
from vitedit.models import find_sites, forward_prefix, make_suffix


@pytest.fixture(scope="module")
def small_vit():
    return make_small_vit()


def _batch(model, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(b, 3, 32, 32, generator=g)
    mixed = clean.clone()
    mixed[:, :, :16, :16] = torch.randn(b, 3, 16, 16, generator=g)
    target = torch.softmax(model(clean) / 5.0, -1)
    return mixed, target


@pytest.mark.parametrize("locality_weight,generalization_weight", [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0)])
def test_vectorized_label_masks_equal_per_sample_loop(small_vit, locality_weight, generalization_weight):
    sites = find_sites(small_vit, [1, 2])
    editor = BatchedEditor(small_vit, sites)
    mixed, target = _batch(small_vit)
    tokens = forward_prefix(small_vit, mixed, 1)
    ref = (tokens.flip(0), target.flip(0)) if locality_weight else None
    pair = (tokens.roll(1, 0), target.roll(1, 0)) if generalization_weight else None
    cfg = MetaTrainConfig(inner_steps=3, outer_steps=4, inner_lr=0.3, sparsity_weight=0.3,
                          locality_weight=locality_weight, generalization_weight=generalization_weight)
    g = torch.Generator().manual_seed(1)
    z = {s.param: torch.rand(4, s.units, generator=g) * 2 - 1 for s in sites}
    vec, vinfo = label_masks(editor, tokens, target, z, cfg, ref, pair)
    loop, linfo = label_masks_loop(editor, tokens, target, z, cfg, ref, pair)
    for p in vec:
        assert vec[p].shape == (4, next(s.units for s in sites if s.param == p))
        torch.testing.assert_close(vec[p], loop[p], atol=1e-4, rtol=0)
    torch.testing.assert_close(vinfo["kl_after"], linfo["kl_after"], atol=1e-5, rtol=1e-4)
    # The bi-level optimization does something: masks moved away from their random start.
    start = {p: torch.sigmoid(cfg.label_sharpness * z[p]) for p in z}
    assert any((vec[p] - start[p]).abs().max() > 0.05 for p in vec)


@pytest.mark.parametrize("term,arg,needs", [("locality_weight", "ref", "reference images"),
                                             ("generalization_weight", "pair", "partner images")])
def test_outer_loss_terms_change_masks_and_need_their_images(small_vit, term, arg, needs):
    sites = find_sites(small_vit, [1, 2])
    editor = BatchedEditor(small_vit, sites)
    mixed, target = _batch(small_vit)
    tokens = forward_prefix(small_vit, mixed, 1)
    g = torch.Generator().manual_seed(2)
    z = {s.param: torch.rand(4, s.units, generator=g) * 2 - 1 for s in sites}
    kw = dict(inner_steps=2, outer_steps=3, inner_lr=0.3, sparsity_weight=0.3)
    with_term = MetaTrainConfig(**{term: 5.0}, **kw)
    with pytest.raises(ValueError, match=needs):
        label_masks(editor, tokens, target, z, with_term)
    plain, _ = label_masks(editor, tokens, target, z, MetaTrainConfig(**kw))
    other, _ = label_masks(editor, tokens, target, z, with_term, **{arg: (tokens.roll(1, 0), target.roll(1, 0))})
    assert any((plain[p] - other[p]).abs().max() > 1e-3 for p in plain)
    with pytest.raises(UsageError, match=term.replace("_", "-")):
        MetaTrainConfig(**{term: -0.5})


def test_prior_weight_is_validated():
    with pytest.raises(UsageError, match="prior-weight"):
        MetaTrainConfig(prior_weight=1.5)
    with pytest.raises(UsageError, match="prior-images"):
        MetaTrainConfig(prior_weight=0.5, prior_images=0)


def test_partners_share_the_class_and_are_used_once():
    classes = torch.tensor([3, 3, 1, 7])
    cand = torch.tensor([1, 3, 5, 3, 3, 0, 2, 2])
    idx = pick_partners(classes, cand)
    assert idx.tolist() == [1, 3, 0, 2]  # two 3s, one 1; no 7 among the candidates: the first unused one
    assert len(set(idx.tolist())) == 4


def test_the_corruption_is_replayed_on_partners(small_vit):
    grid, patch = patch_grid(small_vit)
    clean = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    donor = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    for kind in ("cutmix", "shift", "mix"):
        mixed, corrupt = pseudo_failures(kind, clean, donor, grid, patch, MetaTrainConfig(box_min=0.25, box_max=0.5),
                                         torch.Generator().manual_seed(5))
        assert torch.equal(corrupt(clean), mixed)  # same corruption, not a new draw
        assert not torch.equal(corrupt(clean.flip(0)), mixed)


def test_locality_weight_is_validated():
    from vitedit.errors import UsageError

    with pytest.raises(UsageError, match="locality-weight"):
        MetaTrainConfig(locality_weight=-1.0)
    with pytest.raises(UsageError, match="batch"):
        MetaTrainConfig(locality_weight=1.0, batch=1)


def test_batched_editor_with_base_weights_matches_model(small_vit):
    sites = find_sites(small_vit, [1, 2])
    editor = BatchedEditor(small_vit, sites)
    mixed, _ = _batch(small_vit)
    tokens = forward_prefix(small_vit, mixed, 1)
    torch.testing.assert_close(editor.logits(tokens, editor.expand_base(4)), small_vit(mixed), atol=1e-5, rtol=1e-5)
    # The caller's model keeps its own linear layers.
    assert type(small_vit.blocks[1].mlp.fc1).__name__ == "Linear"


def test_inner_edit_with_full_mask_reduces_kl(small_vit):
    sites = find_sites(small_vit, [1, 2])
    editor = BatchedEditor(small_vit, sites)
    mixed, target = _batch(small_vit)
    tokens = forward_prefix(small_vit, mixed, 1)
    before = kl_per_sample(make_suffix(small_vit, 1)(tokens), target, 5.0)
    cfg = MetaTrainConfig(inner_steps=3, outer_steps=3, inner_lr=0.05, sparsity_weight=0.0)
    z = {s.param: torch.full((4, s.units), 1.0) for s in sites}  # masks ~1: everything editable
    _, info = label_masks(editor, tokens, target, z, cfg)
    assert (info["kl_after"] < before).all()


def test_cutmix_box_is_patch_aligned(small_vit):
    grid, patch = patch_grid(small_vit)
    assert grid == (4, 4) and patch == (8, 8)
    base = torch.zeros(16, 3, 32, 32)
    donor = torch.ones(16, 3, 32, 32)
    mixed = cutmix(base, donor, grid, patch, 0.25, 0.5, torch.Generator().manual_seed(0))
    for img in mixed:
        ys, xs = torch.nonzero(img[0], as_tuple=True)
        assert len(ys) > 0
        h, w = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
        assert int(ys.min()) % 8 == 0 and int(xs.min()) % 8 == 0
        assert h in (8, 16) and w in (8, 16)  # 1 or 2 patches per side on the 4x4 grid
        assert int(img[0].sum()) == h * w  # one solid box


def test_global_shift_is_seeded_and_the_identity_when_its_ranges_are_empty():
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    same = global_shift(x, torch.Generator().manual_seed(1), max_rotation=0.0, scale=(1.0, 1.0), max_shear=0.0,
                        max_shift=0.0, contrast=(1.0, 1.0), max_brightness=0.0)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=1e-5)
    a = global_shift(x, torch.Generator().manual_seed(1))
    b = global_shift(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)
    per_image_change = (a - x).abs().flatten(1).mean(1)
    assert bool((per_image_change > 0.05).all())  # every image moves, not just some


def test_pseudo_failure_kinds(small_vit):
    grid, patch = patch_grid(small_vit)
    base = torch.zeros(32, 3, 32, 32)
    donor = torch.ones(32, 3, 32, 32)
    cfg = MetaTrainConfig(box_min=0.25, box_max=0.5)
    boxes, _ = pseudo_failures("cutmix", base, donor, grid, patch, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(boxes, cutmix(base, donor, grid, patch, 0.25, 0.5, torch.Generator().manual_seed(0)))
    shifted, _ = pseudo_failures("shift", base + torch.arange(32.0)[None, None, :, None], donor, grid, patch, cfg,
                              torch.Generator().manual_seed(0))
    assert not bool((shifted == 1).any())  # no donor pixels
    mixed, _ = pseudo_failures("mix", base, donor, grid, patch, cfg, torch.Generator().manual_seed(0))
    has_box = mixed.flatten(1).max(1).values == 1
    assert 0 < int(has_box.sum()) < 32  # some samples got a box, the others a shift
    with pytest.raises(UsageError, match="--pseudo"):
        MetaTrainConfig(pseudo="mixup")


def test_meta_train_checkpoint_resume_and_artifact(tmp_path, tiny_weights, locality_dir):
    from vitedit.hypernet import load_hypernet
    from vitedit.metatrain import run_meta_train
    from vitedit.models import load_model
    from vitedit.pipeline import ModelOptions

    opts = ModelOptions("test_vit", tiny_weights, None, "cpu")
    cfg = MetaTrainConfig(steps=2, batch=2, inner_steps=1, outer_steps=1, checkpoint_every=1)
    out = tmp_path / "hn"
    res = run_meta_train(opts, locality_dir, "2,3", cfg, out)
    assert res["steps"] == 2 and (out / "hypernet.safetensors").exists() and (out / "checkpoint-rank0.pt").exists()
    loaded = load_model("test_vit", weights=tiny_weights)
    net, meta = load_hypernet(out / "hypernet.safetensors", loaded.identity, loaded.sites([2, 3]))
    assert meta["steps"] == 2 and meta["blocks"] == [2, 3] and meta["model"]["name"] == "test_vit"
    assert set(meta["final_mean_last_50"]) >= {"kl_before", "kl_after", "bce", "label_binary_density", "diversity"}
    # Refuses to overwrite a finished run without --resume.
    from vitedit.errors import WorkspaceError

    with pytest.raises(WorkspaceError, match="--resume"):
        run_meta_train(opts, locality_dir, "2,3", cfg, out)
    # Resume with more steps continues from step 2.
    res2 = run_meta_train(opts, locality_dir, "2,3", MetaTrainConfig(steps=3, batch=2, inner_steps=1, outer_steps=1,
                                                                      checkpoint_every=1), out, resume=True)
    assert res2["steps"] == 3
    import json

    hist = json.loads((out / "history.json").read_text())
    assert [row[0] for row in hist["rows"]] == [1, 2, 3]


def test_meta_train_with_shifted_pseudo_failures_records_the_kind(tmp_path, tiny_weights, locality_dir):
    from vitedit.hypernet import load_hypernet
    from vitedit.metatrain import run_meta_train
    from vitedit.models import load_model
    from vitedit.pipeline import ModelOptions

    opts = ModelOptions("test_vit", tiny_weights, None, "cpu")
    cfg = MetaTrainConfig(steps=2, batch=2, inner_steps=1, outer_steps=1, checkpoint_every=1, pseudo="mix",
                          generalization_weight=1.0, prior_weight=0.5, prior_images=5)
    res = run_meta_train(opts, locality_dir, "2,3", cfg, tmp_path / "hn")
    assert res["steps"] == 2 and res["final_mean_last_50"]["kl_before"] > 0
    loaded = load_model("test_vit", weights=tiny_weights)
    net, meta = load_hypernet(tmp_path / "hn" / "hypernet.safetensors", loaded.identity, loaded.sites([2, 3]))
    assert meta["meta_train_config"]["pseudo"] == "mix"
    # the finished run stores its mean score over clean images: a probability per unit
    assert meta["config"]["prior_weight"] == 0.5
    assert float(net.prior.min()) > 0.0 and float(net.prior.max()) < 1.0
    assert meta["meta_train_config"]["generalization_weight"] == 1.0


@pytest.mark.slow
def test_two_rank_ddp_gives_identical_hypernetworks(tmp_path, tiny_weights, locality_dir):
    """torchrun --nproc-per-node 2 (gloo on CPU): both ranks must end with the same weights."""
    from safetensors.torch import load_file

    script = tmp_path / "rank.py"
    script.write_text(
        "import os, sys, torch\n"
        "from safetensors.torch import save_file\n"
        "from vitedit.metatrain import MetaTrainConfig, run_meta_train\n"
        "import vitedit.metatrain as mt\n"
        "from vitedit.pipeline import ModelOptions\n"
        "captured = {}\n"
        "orig = mt.save_hypernet if hasattr(mt, 'save_hypernet') else None\n"
        "import vitedit.hypernet as hn\n"
        "real_build = hn.build_hypernet\n"
        "def build(cfg):\n"
        "    net = real_build(cfg); captured['net'] = net; return net\n"
        "hn.build_hypernet = build\n"
        f"run_meta_train(ModelOptions('test_vit', {str(tiny_weights)!r}, None, 'cpu'), {str(locality_dir)!r}, '2,3',\n"
        "    MetaTrainConfig(steps=3, batch=2, inner_steps=1, outer_steps=1, checkpoint_every=10),\n"
        f"    {str(tmp_path / 'out')!r})\n"
        "rank = os.environ['RANK']\n"
        f"save_file({{k: v.contiguous() for k, v in captured['net'].state_dict().items()}}, {str(tmp_path)!r} + f'/rank{{rank}}.safetensors')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           "29517", str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # Training changed the weights (so equality is not just two untouched initializations).
    from vitedit.hypernet import build_hypernet, hypernet_config_for
    from vitedit.models import load_model

    loaded = load_model("test_vit", weights=tiny_weights)
    torch.manual_seed(0)
    fresh = build_hypernet(hypernet_config_for(loaded.width, loaded.num_heads, loaded.sites([2, 3]))).state_dict()
    assert any(not torch.equal(fresh[k], a[k]) for k in a)
