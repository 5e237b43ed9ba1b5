"""Tests for vitedit.masks: the global top-k selection, tie-breaking, density validation, and the
unit-scores artifact."""

from __future__ import annotations

import pytest
import torch

from vitedit.errors import ArtifactError, UsageError
from vitedit.masks import UnitMask, UnitScores, units_for, validate_density
from vitedit.models import Site

SITES = (Site(7, "fc1", 40), Site(7, "fc2", 40), Site(8, "fc1", 30), Site(8, "fc2", 30))
IDENTITY = {"name": "test_vit", "weights_sha256": "ab" * 32}


def random_scores(seed: int = 0, sites=SITES) -> UnitScores:
    gen = torch.Generator().manual_seed(seed)
    return UnitScores(tuple(sites), {s.param: torch.rand(s.units, generator=gen) for s in sites}, "random")


def check_mask_shape(mask: UnitMask) -> None:
    for s in mask.sites:
        idx = mask.indices[s.param]
        assert idx.dtype == torch.int64
        assert torch.equal(idx, torch.sort(idx).values)
        assert idx.unique().numel() == idx.numel()
        assert idx.numel() == 0 or (0 <= int(idx.min()) and int(idx.max()) < s.units)


@pytest.mark.parametrize("density", [1e-6, 0.01, 0.05, 0.1, 0.25, 0.5, 0.999, 1.0])
def test_select_picks_exactly_units_for_density(density):
    scores = random_scores()
    mask = scores.select(density)
    assert scores.total == 140
    assert mask.selected == units_for(density, 140) == max(1, round(density * 140))
    assert mask.total == 140
    assert mask.density == pytest.approx(mask.selected / 140)
    check_mask_shape(mask)


def test_selected_units_outscore_every_unselected_unit():
    scores = random_scores(3)
    mask = scores.select(0.2)
    chosen = torch.cat([scores.scores[s.param][mask.dense(s)] for s in SITES])
    rest = torch.cat([scores.scores[s.param][~mask.dense(s)] for s in SITES])
    assert chosen.numel() == 28 and rest.numel() == 112
    assert float(chosen.min()) > float(rest.max())


def test_selection_is_global_not_per_site():
    # Site 8.fc1 holds the 30 highest scores of all; a per-site top-k would spread the units out.
    scores = {s.param: torch.linspace(0.0, 0.5, s.units) for s in SITES}
    scores[SITES[2].param] = torch.linspace(0.6, 1.0, 30)
    mask = UnitScores(SITES, scores, "gradient").select(0.2)  # 28 units
    assert mask.selected == 28
    assert {s.param: int(mask.indices[s.param].numel()) for s in SITES} == {
        SITES[0].param: 0, SITES[1].param: 0, SITES[2].param: 28, SITES[3].param: 0}
    assert mask.indices[SITES[2].param].tolist() == list(range(2, 30))  # its 28 highest


def test_ties_break_by_site_order_then_unit_index():
    sites = (Site(1, "fc1", 4), Site(1, "fc2", 4))
    flat = UnitScores(sites, {s.param: torch.zeros(4) for s in sites}, "random")
    mask = flat.select(3 / 8)
    assert mask.indices[sites[0].param].tolist() == [0, 1, 2]
    assert mask.indices[sites[1].param].tolist() == []

    partial = UnitScores(sites, {sites[0].param: torch.tensor([1.0, 0.0, 1.0, 0.0]),
                                 sites[1].param: torch.tensor([1.0, 1.0, 0.0, 0.0])}, "random")
    mask = partial.select(3 / 8)  # four units tie at 1.0; the first three in (site, unit) order win
    assert mask.indices[sites[0].param].tolist() == [0, 2]
    assert mask.indices[sites[1].param].tolist() == [0]


def test_selection_is_deterministic():
    a, b = random_scores(5).select(0.1), random_scores(5).select(0.1)
    assert all(torch.equal(a.indices[s.param], b.indices[s.param]) for s in SITES)


def test_dense_marks_exactly_the_indices():
    mask = random_scores(1).select(0.3)
    for s in SITES:
        d = mask.dense(s)
        assert d.dtype == torch.bool and d.shape == (s.units,)
        assert d.nonzero().flatten().tolist() == mask.indices[s.param].tolist()


def test_params_edited_counts_rows_and_columns():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=4,
                              embed_dim=64, num_heads=2, num_classes=5)
    sites = (Site(1, "fc1", 256), Site(1, "fc2", 256))
    mask = UnitMask(sites, {sites[0].param: torch.tensor([0, 5, 9]), sites[1].param: torch.tensor([1])})
    assert mask.params_edited(model) == 3 * 64 + 1 * 64  # each unit frees one width-64 row / column


@pytest.mark.parametrize("density", [0, 0.0, -1, 1.5, float("nan"), float("inf")])
def test_validate_density_rejects(density):
    with pytest.raises(UsageError) as e:
        validate_density(density)
    assert "--sparsity" in str(e.value) and "(0, 1]" in str(e.value)
    assert e.value.exit_code == 2
    with pytest.raises(UsageError):
        units_for(density, 100)


def test_validate_density_names_the_flag():
    with pytest.raises(UsageError, match="--sparsities"):
        validate_density(2, "--sparsities")
    assert validate_density(1) == 1.0


@pytest.mark.parametrize("density, total, expected", [(0.05, 1000, 50), (1e-9, 10, 1), (1.0, 7, 7),
                                                      (0.5, 3, 2), (0.01, 9216, 92)])
def test_units_for(density, total, expected):
    assert units_for(density, total) == expected


def test_unit_scores_refuse_wrong_shapes():
    with pytest.raises(ValueError, match=r"\(40,\)"):
        UnitScores(SITES[:1], {SITES[0].param: torch.zeros(39)}, "random")
    with pytest.raises(ValueError):
        UnitScores(SITES[:1], {}, "random")


def test_unit_scores_round_trip(tmp_path):
    scores = random_scores(2)
    path = tmp_path / "scores.safetensors"
    scores.save(path, IDENTITY, extra={"seed": 2})
    back = UnitScores.load(path, IDENTITY)
    assert back.sites == scores.sites and back.locator == "random"
    assert all(torch.equal(back.scores[s.param], scores.scores[s.param]) for s in SITES)
    import json

    meta = json.loads((tmp_path / "scores.json").read_text())
    assert meta["kind"] == "unit-scores" and meta["model"] == IDENTITY and meta["seed"] == 2
    assert "vitedit_version" in meta and "sha256" in meta


@pytest.mark.parametrize("other", [{"name": "test_vit", "weights_sha256": "cd" * 32},
                                   {"name": "vit_base_patch16_224", "weights_sha256": "ab" * 32}])
def test_unit_scores_refuse_another_model(tmp_path, other):
    path = tmp_path / "scores.safetensors"
    random_scores().save(path, IDENTITY)
    with pytest.raises(ArtifactError) as e:
        UnitScores.load(path, other)
    assert e.value.exit_code == 5
    assert "made for" in str(e.value)


def test_unit_scores_refuse_a_file_of_another_kind(tmp_path):
    from vitedit.artifacts import save_tensors

    path = tmp_path / "patch.safetensors"
    save_tensors(path, {"x": torch.zeros(1)}, {"kind": "patch", "model": IDENTITY})
    with pytest.raises(ArtifactError, match="not a vitedit unit-scores file"):
        UnitScores.load(path, IDENTITY)


def test_select_never_picks_excluded_units_and_still_picks_k():
    """exclude (the units earlier edits changed): k units are still chosen, none of them excluded,
    and they are the best of the others; asking for more than the others hold is refused."""
    scores = random_scores(5)
    full = scores.select(0.2)
    barred = {SITES[0].param: full.indices[SITES[0].param], SITES[2].param: full.indices[SITES[2].param][:3]}
    mask = scores.select(0.2, exclude=barred)
    check_mask_shape(mask)
    assert mask.selected == full.selected == 28
    for p, ix in barred.items():
        assert not set(ix.tolist()) & set(mask.indices[p].tolist())
    free = [(float(scores.scores[s.param][i]), s.param, i) for s in SITES for i in range(s.units)
            if i not in set(barred.get(s.param, torch.tensor([], dtype=torch.long)).tolist())]
    best = {(p, i) for _, p, i in sorted(free, key=lambda t: -t[0])[:28]}
    assert {(p, int(i)) for p, ix in mask.indices.items() for i in ix} == best
    assert scores.select(0.2, exclude={}).indices.keys() == full.indices.keys()
    assert all(torch.equal(scores.select(0.2, exclude={}).indices[p], full.indices[p]) for p in full.indices)
    everything = {s.param: torch.arange(s.units) for s in SITES[:3]}   # 110 of 140 units barred
    with pytest.raises(UsageError, match="only 30 of 140"):
        scores.select(0.25, exclude=everything)
