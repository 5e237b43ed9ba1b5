"""Property tests (hypothesis): the selection count rule and the sparse edit's exactness hold for any
density, any scores and any mask, not just the hand-picked cases of test_masks / test_edit."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import small_vit
from vitedit.edit import EditConfig, edit
from vitedit.masks import UnitScores, units_for
from vitedit.models import Site, find_sites

PROPS = settings(max_examples=15, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

densities = st.floats(min_value=0.0, max_value=1.0, exclude_min=True, allow_nan=False)


@pytest.fixture(scope="module")
def setup():
    model = small_vit(depth=3, embed_dim=32, mlp_ratio=2.0, num_classes=4)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        labels = (model(images).argmax(-1) + 1) % 4
    sites = tuple(find_sites(model, [1, 2]))
    return model, images, labels, sites


@st.composite
def scored_sites(draw):
    units = draw(st.lists(st.integers(1, 40), min_size=1, max_size=5))
    sites = tuple(Site(i // 2, "fc1" if i % 2 == 0 else "fc2", u) for i, u in enumerate(units))
    # few distinct values, so ties are common
    values = st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, -1.0, 3.5]), min_size=sum(units), max_size=sum(units))
    flat = torch.tensor(draw(values), dtype=torch.float32)
    scores, off = {}, 0
    for s in sites:
        scores[s.param] = flat[off:off + s.units]
        off += s.units
    return UnitScores(sites, scores, "random")


@PROPS
@given(scores=scored_sites(), density=densities)
def test_selection_count_and_top_k(scores, density):
    mask = scores.select(density)
    total = scores.total
    expected = max(1, int(round(density * total)))
    assert mask.selected == expected == units_for(density, total)
    chosen, rest = [], []
    for s in scores.sites:
        idx = mask.indices[s.param]
        assert idx.dtype == torch.int64 and idx.unique().numel() == idx.numel()
        assert torch.equal(idx, torch.sort(idx).values)
        dense = mask.dense(s)
        chosen.append(scores.scores[s.param][dense])
        rest.append(scores.scores[s.param][~dense])
    chosen, rest = torch.cat(chosen), torch.cat(rest)
    if rest.numel():
        assert float(chosen.min()) >= float(rest.max())  # a global top-k: no unselected unit scores higher


def random_mask(sites, seed, density):
    gen = torch.Generator().manual_seed(seed)
    return UnitScores(sites, {s.param: torch.rand(s.units, generator=gen) for s in sites}, "random").select(density)


@PROPS
@given(seed=st.integers(0, 2**31 - 1), density=st.floats(0.005, 0.5))
def test_edit_is_exact_outside_the_mask_and_revertible(setup, seed, density):
    model, images, labels, sites = setup
    mask = random_mask(sites, seed, density)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = edit(model, mask, images, labels, EditConfig(lr=1e-3, max_steps=2))

    for k, v in model.state_dict().items():  # the caller's model is untouched
        assert torch.equal(v, before[k]), k
    weights = result.patch.weights(model)
    for s in result.patch.sites:
        outside = (~mask.dense(s)).nonzero().flatten()
        assert torch.equal(weights[s.param].index_select(s.dim, outside), before[s.param].index_select(s.dim, outside))
    assert sum(int(i.numel()) for i in result.patch.indices.values()) == mask.selected

    clone = copy.deepcopy(model)
    result.patch.apply(clone)
    for name, w in weights.items():
        assert torch.equal(clone.get_parameter(name), w)
    result.patch.revert(clone)
    for k, v in clone.state_dict().items():
        assert torch.equal(v, before[k]), k


@PROPS
@given(seed=st.integers(0, 2**31 - 1), density=st.floats(0.005, 0.5))
def test_same_seed_gives_the_same_edit_bit_for_bit(setup, seed, density):
    model, images, labels, sites = setup
    a = edit(model, random_mask(sites, seed, density), images, labels, EditConfig(lr=1e-3, max_steps=2))
    b = edit(model, random_mask(sites, seed, density), images, labels, EditConfig(lr=1e-3, max_steps=2))
    assert a.losses == b.losses
    assert set(a.patch.new) == set(b.patch.new)
    for p in a.patch.new:
        assert torch.equal(a.patch.indices[p], b.patch.indices[p])
        assert torch.equal(a.patch.new[p], b.patch.new[p])
