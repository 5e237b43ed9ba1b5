"""Tests for vitedit.edit: the sparse edit's invariants (outside the mask bit-identical, inside
changed, caller's model untouched), the revertible patch, the stopping rule and determinism.

A 4-block, width-64 random-init ViT on 32x32 images; the edit images get labels the base model
gets wrong, so the edit has something to fix.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import small_vit
from vitedit.edit import EditConfig, Patch, edit, edited_copy, first_block
from vitedit.errors import ArtifactError, UsageError
from vitedit.evaluate import TokenCache
from vitedit.masks import UnitScores
from vitedit.models import find_sites, forward_prefix

IDENTITY = {"name": "small_vit", "weights_sha256": "0" * 64}


@pytest.fixture(scope="module")
def model():
    m = small_vit()
    with torch.no_grad():
        # timm's random head (std 0.02) caps the logit margins after the final LayerNorm, so no MLP edit can
        # reach a loss of 0.01; a 50x head behaves like a trained, confident one.
        m.head.weight.mul_(50)
    return m


@pytest.fixture(scope="module")
def data(model):
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_pred = model(images).argmax(-1)
    return images, (base_pred + 1) % 5  # every image is a failure


@pytest.fixture(scope="module")
def sites(model):
    return tuple(find_sites(model, [1, 2]))


def make_mask(sites, density=0.1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return UnitScores(sites, {s.param: torch.rand(s.units, generator=gen) for s in sites}, "random").select(density)


def snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model, state: dict) -> None:
    now = model.state_dict()
    assert set(now) == set(state)
    for k, v in state.items():
        assert torch.equal(now[k], v), k


@pytest.fixture(scope="module")
def edited(model, data, sites):
    images, labels = data
    mask = make_mask(sites)
    before = snapshot(model)
    result = edit(model, mask, images, labels, EditConfig(lr=1e-3, max_steps=5))
    return mask, result, before


def test_weights_outside_the_mask_are_bit_identical_and_inside_changed(model, edited):
    mask, result, _ = edited
    weights = result.patch.weights(model)
    assert set(weights) == {s.param for s in mask.sites}
    for s in mask.sites:
        base = model.get_parameter(s.param).detach()
        new = weights[s.param]
        inside = mask.dense(s)
        outside = (~inside).nonzero().flatten()
        assert torch.equal(new.index_select(s.dim, outside), base.index_select(s.dim, outside)), s.param
        changed = new.index_select(s.dim, mask.indices[s.param]) != base.index_select(s.dim, mask.indices[s.param])
        assert changed.any(), s.param
        # every selected unit moved (each row / column of the slice has at least one changed weight)
        assert changed.any(dim=1 - s.dim).all(), s.param


def test_edit_does_not_touch_the_callers_model(model, edited):
    _, _, before = edited
    assert_state_equal(model, before)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_patch_records_the_mask_and_the_base_slices(model, edited):
    mask, result, before = edited
    p = result.patch
    assert p.sites == mask.sites
    assert p.units_edited == mask.selected
    assert p.params_edited == mask.params_edited(model)
    for s in p.sites:
        assert torch.equal(p.indices[s.param], mask.indices[s.param])
        assert torch.equal(p.old[s.param], before[s.param].index_select(s.dim, mask.indices[s.param]))
        assert p.new[s.param].shape == p.old[s.param].shape
        assert not p.new[s.param].requires_grad


def test_first_loss_is_the_base_models_cross_entropy(model, data, edited):
    images, labels = data
    _, result, _ = edited
    with torch.no_grad():
        expected = F.cross_entropy(model(images), labels)
    torch.testing.assert_close(torch.tensor(result.losses[0]), expected, atol=1e-6, rtol=1e-6)
    assert len(result.losses) == result.steps + 1
    assert result.final_loss == result.losses[-1]


def test_apply_then_revert_restores_the_model_bit_for_bit(model, edited):
    _, result, before = edited
    clone = copy.deepcopy(model)
    result.patch.apply(clone)
    for name, w in result.patch.weights(model).items():
        assert torch.equal(clone.get_parameter(name), w)
    with pytest.raises(ArtifactError, match="cannot apply"):
        result.patch.apply(clone)  # already applied
    result.patch.revert(clone)
    assert_state_equal(clone, before)


def test_revert_on_an_unpatched_model_is_refused(model, edited):
    _, result, before = edited
    clone = copy.deepcopy(model)
    with pytest.raises(ArtifactError, match="cannot revert") as e:
        result.patch.revert(clone)
    assert e.value.exit_code == 5
    assert_state_equal(clone, before)  # nothing was half-written


def test_edited_copy_leaves_the_original(model, edited):
    _, result, before = edited
    clone = edited_copy(model, result.patch)
    assert_state_equal(model, before)
    for name, w in result.patch.weights(model).items():
        assert torch.equal(clone.get_parameter(name), w)


def test_patched_model_gives_the_edits_predictions(model, data, edited):
    images, labels = data
    _, result, _ = edited
    clone = edited_copy(model, result.patch)
    with torch.no_grad():
        logits = clone(images)
    torch.testing.assert_close(F.cross_entropy(logits, labels), torch.tensor(result.final_loss), atol=1e-5, rtol=1e-5)
    assert float((logits.argmax(-1) == labels).float().mean()) == pytest.approx(result.edit_accuracy)


def test_patch_save_load_round_trip(tmp_path, model, edited):
    _, result, _ = edited
    path = tmp_path / "patch.safetensors"
    result.patch.save(path, IDENTITY, extra={"sparsity": 0.1})
    back, meta = Patch.load(path, IDENTITY)
    assert back.sites == result.patch.sites
    for s in back.sites:
        for part in ("indices", "new", "old"):
            assert torch.equal(getattr(back, part)[s.param], getattr(result.patch, part)[s.param])
    assert meta["kind"] == "patch" and meta["sparsity"] == 0.1
    assert meta["units_edited"] == result.patch.units_edited and meta["params_edited"] == result.patch.params_edited
    with pytest.raises(ArtifactError, match="made for"):
        Patch.load(path, {"name": "small_vit", "weights_sha256": "1" * 64})


def test_patch_with_a_corrupted_tensor_file_is_refused(tmp_path, edited):
    _, result, _ = edited
    path = tmp_path / "patch.safetensors"
    result.patch.save(path, IDENTITY)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        Patch.load(path, IDENTITY)


def test_edit_stops_when_the_loss_criterion_is_reached(model, data, sites):
    images, labels = data
    config = EditConfig(lr=1e-3, max_steps=100, loss_threshold=0.01)
    result = edit(model, make_mask(sites, 0.25), images[:3], labels[:3], config)  # converges in ~30 steps
    assert result.converged
    assert 0 < result.steps < config.max_steps
    assert result.final_loss <= config.loss_threshold
    assert result.edit_accuracy == 1.0
    assert all(loss > config.loss_threshold for loss in result.losses[:-1])  # stopped at the first success


def test_edit_runs_max_steps_when_not_converged(model, data, sites):
    images, labels = data
    calls = []
    result = edit(model, make_mask(sites, 0.01), images, labels, EditConfig(lr=1e-6, max_steps=3),
                  progress=lambda *a: calls.append(a))
    assert not result.converged and result.steps == 3
    assert [(c[0], c[1]) for c in calls] == [(1, 3), (2, 3), (3, 3)]
    assert [c[2] for c in calls] == result.losses[:3]


def test_edit_of_an_already_correct_batch_stops_at_step_zero(model, data, sites):
    images, _ = data
    with torch.no_grad():
        base_pred = model(images).argmax(-1)
    result = edit(model, make_mask(sites), images, base_pred, EditConfig(max_steps=5, loss_threshold=100.0))
    assert result.converged and result.steps == 0 and result.edit_accuracy == 1.0
    assert all(torch.equal(result.patch.new[p], result.patch.old[p]) for p in result.patch.new)


def test_same_inputs_give_the_same_patch_bit_for_bit(model, data, sites):
    images, labels = data
    mask = make_mask(sites, 0.05, seed=3)
    a = edit(model, mask, images, labels, EditConfig(lr=1e-3, max_steps=4))
    b = edit(model, mask, images, labels, EditConfig(lr=1e-3, max_steps=4))
    assert a.losses == b.losses
    for p in a.patch.new:
        assert torch.equal(a.patch.new[p], b.patch.new[p])


def test_edit_from_cached_tokens_equals_edit_from_images(model, data, sites):
    images, labels = data
    mask = make_mask(sites, 0.05, seed=4)
    config = EditConfig(lr=1e-3, max_steps=4)
    start = first_block(mask)
    assert start == 1
    from_images = edit(model, mask, images, labels, config)
    with torch.no_grad():
        tokens = forward_prefix(model, images, start)
    from_tokens = edit(model, mask, None, labels, config, tokens=tokens)
    from_cache = edit(model, mask, None, labels, config, tokens=TokenCache(model, start, images).tokens)
    for other in (from_tokens, from_cache):
        assert other.losses == from_images.losses
        for p in from_images.patch.new:
            assert torch.equal(other.patch.new[p], from_images.patch.new[p])


def test_sites_without_selected_units_are_left_out_of_the_patch(model, data, sites):
    images, labels = data
    scores = {s.param: torch.zeros(s.units) for s in sites}
    scores[sites[3].param][:5] = 1.0  # only block 2's fc2 has units above zero
    mask = UnitScores(sites, scores, "gradient").select(5 / sum(s.units for s in sites))
    result = edit(model, mask, images, labels, EditConfig(lr=1e-3, max_steps=2))
    assert [s.param for s in result.patch.sites] == [sites[3].param]
    assert result.patch.indices[sites[3].param].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("kwargs", [dict(lr=0), dict(lr=-1e-3), dict(max_steps=0), dict(loss_threshold=-0.1)])
def test_edit_config_validation(kwargs):
    with pytest.raises(UsageError):
        EditConfig(**kwargs)
