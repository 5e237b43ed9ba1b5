"""Tests for the preserve statistics (vitedit.stats) and the edit objective that uses them.

The statistics of a preserve set streamed in batches equal those computed at once; the penalty they
give is the mean squared change of the edited layer's output on the preserve tokens; saved
statistics are refused for another model, another preserve set or other blocks; the stack's extra
moments do not depend on the order of the earlier edits' images; an edit with them changes only the
mask and leaves the caller's model alone.

A 4-block, width-64 random-init ViT on 32x32 images (conftest.small_vit), CPU, seconds.
"""

from __future__ import annotations

import pytest
import torch

from conftest import small_vit
from vitedit.edit import EditConfig, edit
from vitedit.errors import ArtifactError, UsageError
from vitedit.masks import UnitScores
from vitedit.models import find_sites, forward_prefix, site_layer
from vitedit.preserve import input_second_moments
from vitedit.stats import PreserveStats, compute_stats, fingerprint

IDENTITY = {"name": "small-vit", "weights_sha256": "a" * 64}


@pytest.fixture(scope="module")
def model():
    m = small_vit()
    with torch.no_grad():
        m.head.weight.mul_(50)
    return m


@pytest.fixture(scope="module")
def sites(model):
    return tuple(find_sites(model, [1, 2]))


@pytest.fixture(scope="module")
def images():
    return torch.randn(20, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def stats(model, sites, images):
    return compute_stats(model, sites, images.split(8), model_identity=IDENTITY, preserve_sha256="f" * 64)


def mask_of(sites, density=0.1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return UnitScores(sites, {s.param: torch.rand(s.units, generator=gen) for s in sites}, "random").select(density)


def layer_inputs(model, site, images):
    """The inputs of ``site``'s linear layer on ``images``, one row per token: (N*T, D_in)."""
    seen = []
    handle = site_layer(model, site).register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(images)
    handle.remove()
    return seen[0].reshape(-1, seen[0].shape[-1])


def test_streamed_statistics_equal_those_computed_at_once(model, sites, images, stats):
    at_once = compute_stats(model, sites, [images], model_identity=IDENTITY, preserve_sha256="f" * 64)
    one_by_one = compute_stats(model, sites, images.split(1), model_identity=IDENTITY, preserve_sha256="f" * 64)
    assert stats.images == at_once.images == 20 and stats.tokens == at_once.tokens == 20 * 17
    for s in sites:
        for other in (at_once, one_by_one):
            torch.testing.assert_close(stats.moments[s.param], other.moments[s.param], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(stats.grad_moments[s.param], other.grad_moments[s.param], rtol=1e-4, atol=1e-4)
        assert stats.output_energy[s.param] == pytest.approx(at_once.output_energy[s.param], rel=1e-6)


def test_moments_are_those_of_the_layers_inputs_and_gradient_moments_are_psd(model, sites, images, stats):
    for s in sites:
        x = layer_inputs(model, s, images).double()
        torch.testing.assert_close(stats.moments[s.param], (x.T @ x / len(x)).float(), rtol=1e-4, atol=1e-4)
        g = stats.grad_moments[s.param].double()
        assert g.shape == (site_layer(model, s).out_features,) * 2
        torch.testing.assert_close(g, g.T, rtol=0, atol=1e-12)
        assert float(torch.linalg.eigvalsh(g).min()) > -1e-6 * float(g.diagonal().max())


def test_the_penalty_is_the_mean_squared_output_change_on_preserve_tokens(model, sites, images, stats):
    """Without the gradient moments, sum((dW @ R) * dW) = mean over preserve tokens of |dW x|^2 / tr(W C W^T)."""
    mask = mask_of(sites)
    forms = stats.quadratic_forms(sites, mask.indices, fisher=False)
    gen = torch.Generator().manual_seed(3)
    for s in sites:
        x = layer_inputs(model, s, images)
        idx = mask.indices[s.param]
        w = model.get_parameter(s.param).detach()
        if s.matrix == "fc1":  # rows: dW (k, D) acts on the whole input
            dw = torch.randn(len(idx), w.shape[1], generator=gen)
            change = x @ dw.T
        else:  # columns: dW (D, k) acts on the selected hidden units only
            dw = torch.randn(w.shape[0], len(idx), generator=gen)
            change = x[:, idx] @ dw.T
        left, right = forms[s.param]
        assert left is None
        expected = change.double().pow(2).sum(-1).mean() / stats.output_energy[s.param]
        assert float(((dw @ right) * dw).sum()) == pytest.approx(float(expected), rel=1e-4)


def test_saved_statistics_round_trip_and_are_refused_for_another_model_preserve_set_or_blocks(tmp_path, model,
                                                                                                sites, stats):
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    back = PreserveStats.load(path, IDENTITY, "f" * 64, sites)
    for s in sites:
        assert torch.equal(back.moments[s.param], stats.moments[s.param])
        assert torch.equal(back.grad_moments[s.param], stats.grad_moments[s.param])
    assert (back.images, back.tokens, back.sites) == (stats.images, stats.tokens, stats.sites)
    with pytest.raises(ArtifactError, match="another preserve set") as err:
        PreserveStats.load(path, IDENTITY, "e" * 64, sites)
    assert err.value.exit_code == 5
    with pytest.raises(ArtifactError):
        PreserveStats.load(path, {**IDENTITY, "weights_sha256": "b" * 64}, "f" * 64, sites)
    with pytest.raises(ArtifactError, match="do not cover"):
        PreserveStats.load(path, IDENTITY, "f" * 64, tuple(find_sites(model, [3])))


def test_fingerprint_ignores_names_and_order_but_not_content(tmp_path):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    a.write_bytes(b"one"), b.write_bytes(b"two"), c.write_bytes(b"one")
    assert fingerprint([a, b]) == fingerprint([b, a]) == fingerprint([c, b])
    assert fingerprint([a, b]) != fingerprint([a, a])


def test_the_stacks_moments_do_not_depend_on_the_order_of_the_earlier_images(model, sites, images):
    tokens = forward_prefix(model, images[:12], 1)
    forward = input_second_moments(model, sites, tokens, batch_size=5)
    backward = input_second_moments(model, sites, tokens.flip(0), batch_size=3)
    for p in forward:
        torch.testing.assert_close(forward[p], backward[p], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fisher", [False, True])
def test_a_statistics_edit_changes_only_the_mask_and_not_the_callers_model(model, sites, images, stats, fisher):
    edit_images = images[:4]
    with torch.no_grad():
        labels = (model(edit_images).argmax(-1) + 1) % 5
    use = stats if fisher else PreserveStats(stats.moments, stats.output_energy, stats.images, stats.tokens,
                                             stats.sites, stats.model, stats.preserve_sha256)
    mask = mask_of(sites)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = edit(model, mask, edit_images, labels, EditConfig(lr=1e-3, max_steps=4, stats_weight=10.0), stats=use)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    weights = result.patch.weights(model)
    for s in sites:
        outside = torch.ones(s.units, dtype=torch.bool)
        outside[mask.indices[s.param]] = False
        rows = outside.nonzero().squeeze(1)
        assert torch.equal(before[s.param].index_select(s.dim, rows), weights[s.param].index_select(s.dim, rows))
    assert any(not torch.equal(before[s.param], weights[s.param]) for s in sites)


def test_the_penalty_holds_the_preserve_outputs_closer(model, sites, images, stats):
    edit_images = images[:4]
    with torch.no_grad():
        labels = (model(edit_images).argmax(-1) + 1) % 5
    mask = mask_of(sites, density=0.25)
    free = edit(model, mask, edit_images, labels, EditConfig(lr=3e-3, max_steps=20))
    held = edit(model, mask, edit_images, labels, EditConfig(lr=3e-3, max_steps=20, stats_weight=100.0), stats=stats)
    forms = stats.quadratic_forms(sites, mask.indices)

    def penalty(result):
        return sum(float((((left @ (result.patch.new[p] - result.patch.old[p])) @ right)
                          * (result.patch.new[p] - result.patch.old[p])).sum()) for p, (left, right) in forms.items())

    assert penalty(held) < penalty(free)


def test_the_statistics_objective_needs_statistics(model, sites, images):
    with pytest.raises(UsageError, match="statistics"):
        edit(model, mask_of(sites), images[:2], torch.tensor([0, 1]), EditConfig(stats_weight=1.0))
    with pytest.raises(UsageError, match="--stats-weight"):
        EditConfig(stats_weight=-1.0)
