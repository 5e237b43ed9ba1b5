"""Tests for the edit objectives that keep the rest of the model in place (vitedit.edit + vitedit.preserve).

The invariants of every objective: weights outside the mask stay bit-identical, the selected slices
change, the caller's model is untouched; preservation weight 0 without projection is the paper's
editor step for step; the null-space projection bounds the change of a matrix's outputs on the
preserve inputs by the eigenvalue threshold it was built with.

A 4-block, width-64 random-init ViT on 32x32 images (the fixtures of test_edit), CPU, seconds.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import small_vit
from vitedit.edit import OBJECTIVE_PRESETS, EditConfig, augment_views, edit, objective_config
from vitedit.errors import UsageError
from vitedit.masks import UnitScores
from vitedit.models import find_sites, forward_prefix, make_suffix
from vitedit.preserve import build_anchor_set, build_preserve_set, input_second_moments


@pytest.fixture(scope="module")
def model():
    m = small_vit()
    with torch.no_grad():
        m.head.weight.mul_(50)  # a confident head, as in test_edit: the edit can reach its stopping rule
    return m


@pytest.fixture(scope="module")
def data(model):
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_pred = model(images).argmax(-1)
    return images, (base_pred + 1) % 5


@pytest.fixture(scope="module")
def sites(model):
    return tuple(find_sites(model, [1, 2]))


@pytest.fixture(scope="module")
def preserve(model, sites):
    images = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    return build_preserve_set(model, sites, images)


def make_mask(sites, density=0.1, seed=0, only=None):
    gen = torch.Generator().manual_seed(seed)
    scores = {s.param: torch.rand(s.units, generator=gen) for s in sites}
    if only is not None:  # every other site gets no unit
        scores = {p: (v + 10 if p == only else v * 0) for p, v in scores.items()}
    return UnitScores(sites, scores, "random").select(density)


OBJECTIVES = {
    "plain": EditConfig(lr=1e-3, max_steps=4),
    "kl": EditConfig(lr=1e-3, max_steps=4, preserve_weight=3.0, preserve_batch=8),
    "nullspace": EditConfig(lr=1e-3, max_steps=4, nullspace_threshold=0.3),
    "margin-stop": EditConfig(lr=1e-3, max_steps=4, stop_margin=0.2),
    "augment": EditConfig(lr=1e-3, max_steps=4, augment=1),
    "nearest": EditConfig(lr=1e-3, max_steps=4, preserve_weight=3.0, preserve_batch=8, preserve_nearest=6),
    "local preset": objective_config("local", lr=1e-3, max_steps=4),
    "fragile": EditConfig(lr=1e-3, max_steps=4, preserve_weight=3.0, preserve_batch=4, preserve_fragile=6),
    "plateau": EditConfig(lr=1e-3, max_steps=4, plateau=1),
}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_changes_only_the_mask_and_not_the_callers_model(model, data, sites, preserve, name):
    images, labels = data
    mask = make_mask(sites)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = edit(model, mask, images, labels, OBJECTIVES[name], preserve=preserve)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the caller's model is untouched
    weights = result.patch.weights(model)
    changed_any = False
    for s in mask.sites:
        base, new = before[s.param], weights[s.param]
        outside = torch.ones(s.units, dtype=torch.bool)
        outside[mask.indices[s.param]] = False
        assert torch.equal(base.index_select(s.dim, outside.nonzero().squeeze(1)),
                           new.index_select(s.dim, outside.nonzero().squeeze(1))), s.param
        changed_any |= not torch.equal(base, new)
    assert changed_any and result.steps >= 1


def test_preservation_weight_zero_without_projection_is_the_plain_editor_exactly(model, data, sites, preserve):
    images, labels = data
    mask = make_mask(sites)
    plain = edit(model, mask, images, labels, EditConfig(lr=1e-3, max_steps=6))
    zero = edit(model, mask, images, labels,
                EditConfig(lr=1e-3, max_steps=6, objective="local", preserve_weight=0.0, preserve_batch=8),
                preserve=preserve, seed=5)
    assert plain.losses == zero.losses and plain.steps == zero.steps
    for p in plain.patch.new:
        assert torch.equal(plain.patch.new[p], zero.patch.new[p]), p


def test_preservation_term_changes_the_fit(model, data, sites, preserve):
    """The KL term is really in the loss: the same edit with it ends elsewhere."""
    images, labels = data
    mask = make_mask(sites)
    plain = edit(model, mask, images, labels, EditConfig(lr=1e-3, max_steps=6))
    kl = edit(model, mask, images, labels, EditConfig(lr=1e-3, max_steps=6, preserve_weight=10.0, preserve_batch=8),
              preserve=preserve)
    assert any(not torch.equal(plain.patch.new[p], kl.patch.new[p]) for p in plain.patch.new)


@pytest.fixture(scope="module")
def anchors(model, sites):
    """Images an earlier edit was made on, with what the current model predicts on them."""
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return images, build_anchor_set(model, sites, images)


def test_anchor_set_holds_the_current_models_predictions(model, sites, anchors):
    images, anchor_set = anchors
    with torch.no_grad():
        want = torch.log_softmax(model(images), -1)
    assert len(anchor_set) == 6 and anchor_set.start == min(s.block for s in sites)
    assert torch.allclose(anchor_set.log_probs, want, atol=1e-5)


def test_anchor_views_add_seeded_views_of_every_image_with_the_current_predictions(model, sites, anchors):
    """views=2: the images first (unchanged), then 2 views of each, each view's target the current
    model's prediction on that view; the same seed draws the same views, another seed others."""
    from vitedit.edit import augment_views

    images, anchor_set = anchors
    viewed = build_anchor_set(model, sites, images, views=2, seed=7)
    assert len(viewed) == 3 * len(images) and viewed.images == len(images) == anchor_set.images
    assert torch.equal(viewed.tokens[:6], anchor_set.tokens) and torch.equal(viewed.log_probs[:6], anchor_set.log_probs)
    extra = augment_views(images, 2, torch.Generator().manual_seed(7))
    assert not torch.equal(extra, images.repeat(2, 1, 1, 1))  # views differ from the images
    with torch.no_grad():
        want = torch.log_softmax(model(extra), -1)
    assert torch.allclose(viewed.log_probs[6:], want, atol=1e-5)
    assert torch.equal(build_anchor_set(model, sites, images, views=2, seed=7).tokens, viewed.tokens)
    assert not torch.equal(build_anchor_set(model, sites, images, views=2, seed=8).tokens, viewed.tokens)
    with pytest.raises(UsageError, match="images"):
        build_anchor_set(model, sites, tokens=anchor_set.tokens, views=1)


def test_preserve_targets_can_come_from_the_base_weights_while_the_model_holds_a_stack(model, sites, preserve):
    """On top of a stack the preserve set keeps the base model's behaviour: built on the edited model
    with the base weights substituted, it equals the one built on the base model."""
    import copy

    stacked = copy.deepcopy(model)
    with torch.no_grad():
        for s in sites:
            stacked.get_parameter(s.param).add_(0.05 * torch.randn_like(stacked.get_parameter(s.param)))
    base_weights = {s.param: model.get_parameter(s.param).detach() for s in sites}
    held = build_preserve_set(stacked, sites, tokens=preserve.tokens, targets_from=base_weights)
    drifted = build_preserve_set(stacked, sites, tokens=preserve.tokens)
    assert torch.allclose(held.base_log_probs, preserve.base_log_probs, atol=1e-5)
    assert torch.allclose(held.features, preserve.features, atol=1e-5)
    for p in preserve.second_moments:
        assert torch.allclose(held.second_moments[p], preserve.second_moments[p], atol=1e-5)
    assert not torch.allclose(drifted.base_log_probs, preserve.base_log_probs, atol=1e-3)


def test_anchor_weight_zero_or_no_anchors_is_the_edit_without_them(model, data, sites, anchors):
    images, labels = data
    mask = make_mask(sites)
    ref = edit(model, mask, images, labels, EditConfig(lr=1e-3, max_steps=6))
    for cfg, a in ((EditConfig(lr=1e-3, max_steps=6, anchor_weight=0.0), anchors[1]),
                   (EditConfig(lr=1e-3, max_steps=6, anchor_weight=5.0), None)):
        other = edit(model, mask, images, labels, cfg, anchors=a)
        assert other.losses == ref.losses
        assert all(torch.equal(ref.patch.new[p], other.patch.new[p]) for p in ref.patch.new)


def test_anchor_term_keeps_the_earlier_images_predictions(model, data, sites, anchors):
    """An edit with the anchor term moves the anchor images' outputs less than the same edit
    without it, and still changes only the mask."""
    images, labels = data
    anchor_images, anchor_set = anchors
    mask = make_mask(sites, density=0.3)

    def drift(result):
        edited = result.patch.weights(model)
        with torch.no_grad():
            logp = torch.log_softmax(torch.func.functional_call(model, edited, (anchor_images,)), -1)
        return float(torch.nn.functional.kl_div(logp, anchor_set.log_probs, log_target=True, reduction="batchmean"))

    free = edit(model, mask, images, labels, EditConfig(lr=3e-3, max_steps=20, loss_threshold=0.0))
    held = edit(model, mask, images, labels, EditConfig(lr=3e-3, max_steps=20, loss_threshold=0.0, anchor_weight=20.0),
                anchors=anchor_set)
    assert drift(free) > 1e-3
    assert drift(held) < 0.5 * drift(free)
    before = model.state_dict()
    weights = held.patch.weights(model)
    for s in mask.sites:
        outside = torch.ones(s.units, dtype=torch.bool)
        outside[mask.indices[s.param]] = False
        rows = outside.nonzero().squeeze(1)
        assert torch.equal(before[s.param].index_select(s.dim, rows), weights[s.param].index_select(s.dim, rows))


@pytest.mark.parametrize("matrix", ["fc1", "fc2"])
def test_nullspace_projection_bounds_the_change_on_preserve_inputs(model, data, sites, preserve, matrix):
    """For the first edited block the inputs of fc1 (and of fc2, when fc1 is not edited) are the base
    model's, so the bound is exact: with the update D projected onto eigenvectors of S = X^T X / n
    whose eigenvalues are <= t * max, mean over preserve tokens of |D x|^2 <= t * max * |D|_F^2.
    Unprojected, the same edit breaks the bound (the test can fail)."""
    images, labels = data
    site = next(s for s in sites if s.block == 1 and s.matrix == matrix)
    mask = make_mask(sites, density=0.1, only=site.param)
    threshold = 0.05
    cfg = EditConfig(lr=1e-2, max_steps=5)

    def change_on_preserve(result):
        delta = result.patch.new[site.param] - result.patch.old[site.param]  # fc1 (k, D), fc2 (D_out, k)
        moment = preserve.second_moments[site.param]
        if matrix == "fc2":
            idx = mask.indices[site.param]
            moment = moment.index_select(0, idx).index_select(1, idx)
        mean_sq = float(torch.einsum("ij,jk,ik->", delta.double(), moment.double(), delta.double()))
        bound = threshold * float(torch.linalg.eigvalsh(moment.double())[-1]) * float(delta.double().pow(2).sum())
        return mean_sq, bound

    projected = edit(model, mask, images, labels, EditConfig(lr=1e-2, max_steps=5, nullspace_threshold=threshold),
                     preserve=preserve)
    mean_sq, bound = change_on_preserve(projected)
    assert bound > 0 and mean_sq <= bound * (1 + 1e-6) + 1e-12
    free_sq, free_bound = change_on_preserve(edit(model, mask, images, labels, cfg))
    assert free_sq > free_bound  # without the projection the preserve outputs move far more


def test_second_moments_are_those_of_the_linear_inputs(model, sites, preserve):
    """The hooked inputs of the first edited block's fc1 equal norm2(x + attn(norm1(x))) of the prefix tokens."""
    block = model.blocks[1]
    with torch.no_grad():
        x = preserve.tokens
        h = x + block.ls1(block.attn(block.norm1(x)))
        k = block.norm2(h).reshape(-1, x.shape[-1]).double()
    expected = (k.T @ k / len(k)).float()
    torch.testing.assert_close(preserve.second_moments["blocks.1.mlp.fc1.weight"], expected, rtol=1e-5, atol=1e-6)
    again = input_second_moments(model, sites, preserve.tokens)
    for p in again:
        torch.testing.assert_close(again[p], preserve.second_moments[p], rtol=0, atol=0)


def test_projector_is_an_orthogonal_projection(preserve, sites):
    for s in sites:
        idx = torch.arange(0, s.units, 7)
        p = preserve.projector(s, idx, 0.1)
        torch.testing.assert_close(p @ p, p, rtol=0, atol=1e-5)
        torch.testing.assert_close(p, p.T, rtol=0, atol=1e-6)
        assert 0 < preserve.null_dims(s, idx, 0.1) < p.shape[0]
        assert preserve.null_dims(s, idx, 0.01) <= preserve.null_dims(s, idx, 0.1)  # stricter: fewer directions


def test_margin_stop_stops_earlier_than_the_loss_rule(model, data, sites):
    images, labels = data
    mask = make_mask(sites, density=0.25)
    by_loss = edit(model, mask, images, labels, EditConfig(lr=3e-3, max_steps=60))
    by_margin = edit(model, mask, images, labels, EditConfig(lr=3e-3, max_steps=60, stop_margin=0.2))
    assert by_margin.converged and by_margin.edit_accuracy == 1.0
    assert by_margin.steps < by_loss.steps
    probs = torch.softmax(make_suffix(model, 1)(forward_prefix(model, images, 1)), -1)  # base: all wrong
    assert not bool((probs.argmax(-1) == labels).any())


def test_the_preserve_terms_need_a_preserve_set(model, data, sites):
    images, labels = data
    with pytest.raises(UsageError, match="preserve"):
        edit(model, make_mask(sites), images, labels, EditConfig(preserve_weight=1.0))
    with pytest.raises(UsageError, match="preserve"):
        edit(model, make_mask(sites), images, labels, EditConfig(nullspace_threshold=0.1))


@pytest.mark.parametrize("kwargs, flag", [
    (dict(preserve_weight=-1.0), "--preserve-weight"), (dict(nullspace_threshold=0.0), "--nullspace"),
    (dict(nullspace_threshold=2.0), "--nullspace"), (dict(stop_margin=1.0), "--stop-margin"),
    (dict(preserve_batch=0), "--preserve-batch"), (dict(augment=-1), "--augment"),
    (dict(anchor_weight=-1.0), "--anchor-weight"), (dict(anchor_views=-1), "--anchor-views"),
    (dict(objective="gentle"), "--objective")])
def test_edit_config_names_the_flag(kwargs, flag):
    with pytest.raises(UsageError, match=flag):
        EditConfig(**kwargs)


def test_objective_presets():
    assert objective_config("plain") == EditConfig()
    local = objective_config("local", lr=1e-3, nullspace_threshold="off", max_steps=None)
    assert local.objective == "local" and local.lr == 1e-3 and local.nullspace_threshold is None
    assert local.preserve_weight == OBJECTIVE_PRESETS["local"]["preserve_weight"] > 0
    with pytest.raises(UsageError, match="--objective"):
        objective_config("gentle")


def test_augmented_views_keep_shape_and_content():
    x = torch.arange(2 * 1 * 28 * 28, dtype=torch.float32).reshape(2, 1, 28, 28)
    views = augment_views(x, 3, torch.Generator().manual_seed(0))
    assert views.shape == (6, 1, 28, 28)
    again = augment_views(x, 3, torch.Generator().manual_seed(0))
    assert torch.equal(views, again)  # seeded
    # each view is a shift (by at most 2 pixels) of the image or of its mirror: the centre survives
    for v, src in zip(views, x.repeat(3, 1, 1, 1)):
        ok = any(torch.equal(v[:, 2:-2, 2:-2], cand[:, 2 + dy:26 + dy, 2 + dx:26 + dx])
                 for cand in (src, src.flip(-1)) for dy in range(-2, 3) for dx in range(-2, 3))
        assert ok


def test_fragile_minibatches_are_those_of_the_preserve_set_cut_to_its_lowest_margin_images(model, data, sites, preserve):
    """preserve_fragile=N draws exactly the minibatches the same edit draws from a preserve set that
    holds only the N images with the smallest base top-2 margin (same seed, same order)."""
    images, labels = data
    mask = make_mask(sites)
    top2 = preserve.base_log_probs.topk(2, -1).values
    rows = (top2[:, 0] - top2[:, 1]).topk(6, largest=False).indices.sort().values
    cut = build_preserve_set(model, sites, tokens=preserve.tokens[rows])
    cfg = EditConfig(lr=1e-3, max_steps=6, preserve_weight=3.0, preserve_batch=4)
    fragile = edit(model, mask, images, labels, replace(cfg, preserve_fragile=6), preserve=preserve, seed=3)
    subset = edit(model, mask, images, labels, cfg, preserve=cut, seed=3)
    assert fragile.losses == subset.losses
    assert all(torch.equal(fragile.patch.new[p], subset.patch.new[p]) for p in fragile.patch.new)
    whole = edit(model, mask, images, labels, cfg, preserve=preserve, seed=3)
    assert any(not torch.equal(fragile.patch.new[p], whole.patch.new[p]) for p in whole.patch.new)
    none = edit(model, mask, images, labels, replace(cfg, preserve_fragile=6, fragile_share=0.0), preserve=preserve,
                seed=3)  # a share of 0: every row from the whole set, as without the fragile pool
    assert none.losses == whole.losses


def test_anchor_batch_covering_every_anchor_is_the_full_anchor_term(model, data, sites, anchors):
    images, labels = data
    mask = make_mask(sites)
    cfg = EditConfig(lr=1e-3, max_steps=6, anchor_weight=5.0)
    full = edit(model, mask, images, labels, cfg, anchors=anchors[1])
    covering = edit(model, mask, images, labels, replace(cfg, anchor_batch=len(anchors[1])), anchors=anchors[1])
    part = edit(model, mask, images, labels, replace(cfg, anchor_batch=2), anchors=anchors[1])
    assert full.losses == covering.losses
    assert all(torch.equal(full.patch.new[p], covering.patch.new[p]) for p in full.patch.new)
    assert any(not torch.equal(full.patch.new[p], part.patch.new[p]) for p in full.patch.new)


def test_the_plateau_rule():
    from vitedit.edit import _plateaued

    assert not _plateaued([1.0, 0.5, 0.25, 0.1], 0)
    assert not _plateaued([1.0, 0.5, 0.25], 2)                 # too few steps to compare two windows
    assert not _plateaued([1.0, 0.8, 0.5, 0.4], 2)             # 0.45 < 0.95 * 0.9: still falling
    assert _plateaued([0.50, 0.49, 0.49, 0.48], 2)             # 0.485 > 0.95 * 0.495
    with pytest.raises(UsageError, match="plateau"):
        EditConfig(plateau=-1)


def test_a_plateau_stops_an_edit_the_loss_rule_would_run_to_its_step_limit(model, data, sites, preserve):
    """A preservation term holds the loss above the paper's threshold: without the plateau rule the
    edit runs all its steps; with it, it stops once every edit image is right and the loss is flat."""
    images, labels = data
    mask = make_mask(sites, density=0.25)
    cfg = EditConfig(lr=3e-3, max_steps=150, loss_threshold=1e-4, preserve_weight=1.0, preserve_batch=24)
    by_loss = edit(model, mask, images, labels, cfg, preserve=preserve)
    by_plateau = edit(model, mask, images, labels, replace(cfg, plateau=5), preserve=preserve)
    assert by_loss.steps == 150 and not by_loss.converged
    assert by_plateau.converged and by_plateau.edit_accuracy == 1.0 and by_plateau.steps < 150


def test_with_a_plateau_the_loss_rule_no_longer_ends_the_edit(model, data, sites, preserve):
    """The paper's loss rule can end an edit as soon as a large step reaches its threshold, before a
    preservation term has acted; with a plateau window only the plateau ends it."""
    images, labels = data
    mask = make_mask(sites, density=0.25)
    cfg = EditConfig(lr=3e-3, max_steps=60, loss_threshold=1.0, preserve_weight=3.0, preserve_batch=8)
    by_loss = edit(model, mask, images, labels, cfg, preserve=preserve)
    by_plateau = edit(model, mask, images, labels, replace(cfg, plateau=3), preserve=preserve)
    assert by_loss.converged and by_loss.steps < 60
    assert by_plateau.steps > by_loss.steps
