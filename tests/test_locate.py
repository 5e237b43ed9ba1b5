"""Tests for vitedit.locate: the locator registry, the locators' outputs (the gradient one
against a manual autograd computation), and aggregation over the edit images only."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import small_vit
from vitedit.errors import UsageError
from vitedit.hypernet import build_hypernet, hypernet_config_for
from vitedit.locate import (
    LOCATORS,
    LocateInputs,
    aggregate,
    bilevel_locator,
    cls_features,
    get_locator,
    gradient_locator,
    hypernet_locator,
    random_locator,
    register,
)
from vitedit.masks import UnitScores
from vitedit.models import find_sites


@pytest.fixture(scope="module")
def model():
    return small_vit()


@pytest.fixture(scope="module")
def inputs(model) -> LocateInputs:
    sites = tuple(find_sites(model, [1, 2]))
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([4, 0, 2])
    return LocateInputs(model, sites, images, labels, seed=0)


# ----------------------------------------------------------------------------- registry


def test_registry_has_the_four_locators():
    assert {"hypernet", "gradient", "random", "bilevel"} <= set(LOCATORS)
    assert get_locator("gradient") is gradient_locator
    assert get_locator("random") is random_locator
    assert get_locator("hypernet") is hypernet_locator


def test_registering_a_duplicate_name_raises():
    with pytest.raises(ValueError, match="already registered"):
        register("gradient")(lambda inputs: {})
    assert LOCATORS["gradient"] is gradient_locator  # the original is kept


def test_registering_a_new_locator_makes_it_available():
    def constant(inputs):
        return {s.param: torch.ones(1, s.units) for s in inputs.sites}

    try:
        assert register("test-constant")(constant) is constant
        assert get_locator("test-constant") is constant
    finally:
        LOCATORS.pop("test-constant", None)


def test_unknown_locator_is_a_usage_error_listing_the_choices():
    with pytest.raises(UsageError) as e:
        get_locator("gradeint")
    assert "gradient" in str(e.value) and "hypernet" in str(e.value) and "random" in str(e.value)


# ----------------------------------------------------------------------------- random


def test_random_locator_is_seeded(inputs):
    a = random_locator(inputs)
    b = random_locator(LocateInputs(inputs.model, inputs.sites, inputs.images, inputs.labels, seed=0))
    c = random_locator(LocateInputs(inputs.model, inputs.sites, inputs.images, inputs.labels, seed=1))
    assert set(a) == {s.param for s in inputs.sites}
    for s in inputs.sites:
        assert a[s.param].shape == (1, s.units)  # image-independent
        assert float(a[s.param].min()) >= 0.0 and float(a[s.param].max()) < 1.0
        assert torch.equal(a[s.param], b[s.param])
        assert not torch.equal(a[s.param], c[s.param])
    # each site gets its own draw, not one vector repeated
    assert not torch.equal(a[inputs.sites[0].param], a[inputs.sites[1].param])


# ----------------------------------------------------------------------------- gradient


def manual_grad_norms(model, sites, image, label) -> dict[str, torch.Tensor]:
    """Per-unit L2 norm of d CE / d W for one image, by plain autograd on a copy of the whole model."""
    m = copy.deepcopy(model)
    for s in sites:
        m.get_parameter(s.param).requires_grad_(True)
    loss = F.cross_entropy(m(image[None]), label[None])
    loss.backward()
    out = {}
    for s in sites:
        g = m.get_parameter(s.param).grad
        out[s.param] = g.norm(dim=1) if s.matrix == "fc1" else g.norm(dim=0)  # row of fc1 / column of fc2
    return out


def test_gradient_locator_equals_manual_per_unit_grad_norms(inputs):
    scores = gradient_locator(inputs)
    for s in inputs.sites:
        assert scores[s.param].shape == (3, s.units)  # one row per failure image
    for i in range(2):
        expected = manual_grad_norms(inputs.model, inputs.sites, inputs.images[i], inputs.labels[i])
        for s in inputs.sites:
            torch.testing.assert_close(scores[s.param][i], expected[s.param], atol=1e-7, rtol=1e-4)
    assert not any(p.requires_grad for p in inputs.model.parameters())  # the model stays frozen


def test_gradient_scores_depend_on_the_label(inputs):
    other = LocateInputs(inputs.model, inputs.sites, inputs.images, (inputs.labels + 1) % 5)
    a, b = gradient_locator(inputs), gradient_locator(other)
    p = inputs.sites[0].param
    assert not torch.allclose(a[p], b[p])


# ----------------------------------------------------------------------------- bilevel


def test_bilevel_locator_scores_each_image_seeded_and_leaves_the_model_alone(inputs, monkeypatch):
    before = {k: v.clone() for k, v in inputs.model.state_dict().items()}
    a = bilevel_locator(inputs)
    for s in inputs.sites:
        assert a[s.param].shape == (3, s.units)
        assert float(a[s.param].min()) > 0.0 and float(a[s.param].max()) < 1.0
    assert all(torch.equal(v, inputs.model.state_dict()[k]) for k, v in before.items())
    assert not any(p.requires_grad for p in inputs.model.parameters())
    # images are optimized independently: one at a time gives the same scores as all together
    import vitedit.locate as loc

    monkeypatch.setattr(loc, "BILEVEL_BATCH", 1)
    b = bilevel_locator(inputs)
    for s in inputs.sites:
        torch.testing.assert_close(a[s.param], b[s.param], atol=1e-4, rtol=1e-3)  # RMSprop amplifies float noise on tiny gradients
    c = bilevel_locator(LocateInputs(inputs.model, inputs.sites, inputs.images, inputs.labels, seed=1))
    assert not torch.allclose(a[inputs.sites[0].param], c[inputs.sites[0].param])


def test_bilevel_scores_depend_on_the_label(inputs):
    other = LocateInputs(inputs.model, inputs.sites, inputs.images, (inputs.labels + 1) % 5)
    a, b = bilevel_locator(inputs), bilevel_locator(other)
    p = inputs.sites[0].param
    assert not torch.allclose(a[p], b[p])


# ----------------------------------------------------------------------------- hypernet


def test_hypernet_locator_returns_per_image_scores_in_unit_interval(inputs):
    torch.manual_seed(0)
    net = build_hypernet(hypernet_config_for(64, 2, inputs.sites, depth=1)).eval()
    scores = hypernet_locator(LocateInputs(inputs.model, inputs.sites, inputs.images, inputs.labels, 0, net))
    assert set(scores) == {s.param for s in inputs.sites}
    for s in inputs.sites:
        t = scores[s.param]
        assert t.shape == (3, s.units)
        assert float(t.min()) > 0.0 and float(t.max()) < 1.0
    # fed the model's [CLS] features: the same as calling the net on them directly
    with torch.no_grad():
        direct = net(cls_features(inputs.model, inputs.images, 1))
    for s, d in zip(inputs.sites, direct):
        torch.testing.assert_close(scores[s.param], d, atol=0, rtol=0)


def test_hypernet_prior_subtracts_the_weighted_mean_score_and_survives_save_and_load(inputs, tmp_path):
    from vitedit.hypernet import load_hypernet, save_hypernet

    torch.manual_seed(0)
    plain = build_hypernet(hypernet_config_for(64, 2, inputs.sites, depth=1)).eval()
    assert not plain.prior.any()  # zero by default: the paper's scores
    prior = torch.rand(plain.prior.shape, generator=torch.Generator().manual_seed(3))
    contrast = build_hypernet(hypernet_config_for(64, 2, inputs.sites, depth=1, prior_weight=0.5)).eval()
    contrast.load_state_dict({**plain.state_dict(), "prior": prior})
    feats = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base, shifted = plain(feats), contrast(feats)
    expected = prior.split([s.units for s in inputs.sites])
    for b, c, p in zip(base, shifted, expected):
        torch.testing.assert_close(c, b - 0.5 * p)
    identity = {"name": "test", "weights_sha256": "0" * 64}
    save_hypernet(tmp_path / "h.safetensors", contrast, identity)
    loaded, meta = load_hypernet(tmp_path / "h.safetensors", identity, inputs.sites)
    assert meta["config"]["prior_weight"] == 0.5 and torch.equal(loaded.prior, prior)
    # An artifact written before the prior existed (no "prior" tensor) loads with a zero prior.
    from vitedit.artifacts import load_tensors, save_tensors

    tensors, meta = load_tensors(tmp_path / "h.safetensors", "hypernetwork")
    meta["config"].pop("prior_weight")
    save_tensors(tmp_path / "old.safetensors", {k: v for k, v in tensors.items() if k != "prior"},
                 {k: v for k, v in meta.items() if k not in ("sha256", "vitedit_version")})
    old, _ = load_hypernet(tmp_path / "old.safetensors", identity, inputs.sites)
    assert not old.prior.any() and old.config.prior_weight == 0.0


def test_hypernet_locator_without_a_hypernet_is_a_usage_error(inputs):
    with pytest.raises(UsageError, match="--hypernet"):
        hypernet_locator(inputs)


def test_cls_features_are_the_models_pre_logits(model, inputs):
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(inputs.images), pre_logits=True)
    feats = cls_features(model, inputs.images, 2, batch_size=2)  # two batches
    assert feats.shape == (3, 64)
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- aggregate


def test_aggregate_averages_only_the_given_rows(inputs):
    sites = inputs.sites
    per_image = {s.param: torch.arange(4 * s.units, dtype=torch.float32).reshape(4, s.units) * (k + 1)
                 for k, s in enumerate(sites)}
    per_image[sites[0].param][1] = 1e6  # a held-out image with extreme scores must not leak in
    scores = aggregate(per_image, sites, [0, 2, 3], "gradient")
    assert isinstance(scores, UnitScores) and scores.locator == "gradient" and scores.sites == sites
    for s in sites:
        expected = per_image[s.param][[0, 2, 3]].mean(0)
        torch.testing.assert_close(scores.scores[s.param], expected, atol=0, rtol=0)
    everything = aggregate(per_image, sites, None, "gradient")
    torch.testing.assert_close(everything.scores[sites[1].param], per_image[sites[1].param].mean(0), atol=0, rtol=0)


def test_aggregate_passes_image_independent_scores_through(inputs):
    per_image = random_locator(inputs)
    scores = aggregate(per_image, inputs.sites, [0, 2], "random")
    for s in inputs.sites:
        assert torch.equal(scores.scores[s.param], per_image[s.param][0])
