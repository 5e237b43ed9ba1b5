"""Bounded memory at scale: the token cache budget, batched locate, and failure images kept by path.

Tiny random-init ``test_vit`` (conftest), generated image folders, CPU. Small batch sizes and a zero
budget stand in for "too large to hold": they exercise the same code paths as 10,000 images would.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_images

from vitedit.cli import main
from vitedit.errors import UsageError


@pytest.fixture(scope="module")
def vit(tiny_weights):
    import timm
    from safetensors.torch import load_file

    model = timm.create_model("test_vit", pretrained=False, num_classes=4)
    model.load_state_dict(load_file(str(tiny_weights)))
    return model.eval().requires_grad_(False)


def cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return (0 if e.value.code is None else int(e.value.code)), out.getvalue(), err.getvalue()


def model_args(weights: Path, labels: Path) -> list:
    return ["--model", "test_vit", "--weights", weights, "--labels", labels]


def perturbed(model) -> dict:
    """Edited-looking weights for two MLP matrices (seeded), to compare caches under an edit."""
    g = torch.Generator().manual_seed(0)
    return {p: model.get_parameter(p) + 0.05 * torch.randn(model.get_parameter(p).shape, generator=g)
            for p in ("blocks.2.mlp.fc1.weight", "blocks.3.mlp.fc2.weight")}


# ----------------------------------------------------------------------------- TokenCache budget


def test_streamed_and_cached_tokens_give_identical_results(vit):
    from vitedit.evaluate import TokenCache

    images = torch.randn(11, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    cached = TokenCache(vit, 2, images, batch_size=4)
    streamed = TokenCache(vit, 2, images, batch_size=4, budget_bytes=0)
    from_batches = TokenCache(vit, 2, lambda: iter(images.split(4)), batch_size=4, budget_bytes=0)
    assert cached.cached and not streamed.cached and not from_batches.cached
    assert len(cached) == len(streamed) == len(from_batches) == 11
    w = perturbed(vit)
    for weights in (None, w):
        base = cached.logits(weights)
        assert base.shape == (11, 4)
        for other in (streamed, from_batches):
            assert torch.equal(other.logits(weights), base)  # same batches, same calls: bit-identical
            assert torch.equal(other.predict(weights), cached.predict(weights))
    assert torch.equal(streamed.tokens, cached.tokens) and cached.tokens.shape[0] == 11


def test_a_set_over_the_budget_midway_is_streamed(vit):
    from vitedit.evaluate import TokenCache

    images = torch.randn(10, 3, 160, 160, generator=torch.Generator().manual_seed(2))
    per_image = TokenCache(vit, 1, images[:1]).tokens[0]
    one_image = per_image.numel() * per_image.element_size()
    fits = TokenCache(vit, 1, images, batch_size=4, budget_bytes=10 * one_image)
    over = TokenCache(vit, 1, images, batch_size=4, budget_bytes=6 * one_image)  # fails at the 2nd batch
    assert fits.cached and not over.cached and len(over) == 10
    assert torch.equal(over.predict(perturbed(vit)), fits.predict(perturbed(vit)))


def test_cache_budget_env_var(vit, monkeypatch):
    from vitedit.evaluate import CACHE_BUDGET_ENV, DEFAULT_CACHE_BUDGET_MB, TokenCache, cache_budget_bytes

    monkeypatch.delenv(CACHE_BUDGET_ENV, raising=False)
    assert cache_budget_bytes() == DEFAULT_CACHE_BUDGET_MB * 2**20 == 2**30
    monkeypatch.setenv(CACHE_BUDGET_ENV, "0")
    assert not TokenCache(vit, 1, torch.zeros(2, 3, 160, 160)).cached
    monkeypatch.setenv(CACHE_BUDGET_ENV, "0.5")
    assert cache_budget_bytes() == 2**19
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv(CACHE_BUDGET_ENV, bad)
        with pytest.raises(UsageError, match=CACHE_BUDGET_ENV):
            cache_budget_bytes()


# ----------------------------------------------------------------------------- batched locators


def test_gradient_scores_in_batches_equal_one_call(vit):
    from vitedit.locate import LocateInputs, gradient_locator, score_batches
    from vitedit.models import find_sites

    sites = tuple(find_sites(vit, [1, 2]))
    images = torch.randn(7, 3, 160, 160, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    whole = gradient_locator(LocateInputs(vit, sites, images, labels))
    batches = [(images[i:i + 3], labels[i:i + 3]) for i in range(0, 7, 3)] + [(images[:0], labels[:0])]
    joined = score_batches("gradient", vit, sites, iter(batches))
    for s in sites:
        assert joined[s.param].shape == (7, s.units)
        torch.testing.assert_close(joined[s.param], whole[s.param], atol=1e-7, rtol=1e-5)


def test_image_free_locator_runs_once_and_still_consumes_the_batches(vit):
    from vitedit.locate import LocateInputs, random_locator, score_batches
    from vitedit.models import find_sites

    sites = tuple(find_sites(vit, [1]))
    seen = []

    def batches():
        for i in range(3):
            seen.append(i)
            yield torch.zeros(2, 3, 160, 160), torch.zeros(2, dtype=torch.long)

    scores = score_batches("random", vit, sites, batches(), seed=4)
    assert seen == [0, 1, 2]
    expected = random_locator(LocateInputs(vit, sites, None, None, seed=4))
    assert all(torch.equal(scores[p], expected[p]) for p in expected)


# ----------------------------------------------------------------------------- the workspace at scale


@pytest.fixture
def small_batches(monkeypatch):
    """Batches of 4 images everywhere the pipeline reads image sets: several batches per set."""
    import vitedit.evaluate

    monkeypatch.setattr(vitedit.evaluate, "DEFAULT_BATCH", 4)


def test_locate_records_failures_by_path_and_hash_not_as_tensors(tmp_path, tiny_weights, labels_file, small_batches,
                                                                 monkeypatch):
    from vitedit.artifacts import load_tensors, sha256_file

    failures = write_images(tmp_path / "failures", {"cat": 7, "dog": 6, "ship": 5}, seed=11)
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("locate", "failures", *model_args(tiny_weights, labels_file), "--json")  # relative path
    assert code == 0, err
    res = json.loads(out)
    ws = tmp_path / ".vitedit"
    assert not (ws / "images.safetensors").exists()
    state = json.loads((ws / "workspace.json").read_text())
    assert len(state["images"]) == 18 and len(state["failing"]) == res["failures"]
    for i, img in enumerate(state["images"]):
        assert Path(img["path"]).is_absolute() and Path(img["path"]).is_relative_to(failures.resolve())
        assert ("sha256" in img) == (i in state["failing"])
        if "sha256" in img:
            assert img["sha256"] == sha256_file(img["path"]) and img["prediction"] != img["label"]
    scores, _ = load_tensors(ws / "scores.safetensors")
    assert all(t.shape[0] == res["failures"] for t in scores.values())  # one row per failure, over 5 batches


def test_batched_locate_scores_equal_unbatched(tmp_path, tiny_weights, labels_file, monkeypatch):
    from vitedit.artifacts import load_tensors
    import vitedit.evaluate

    failures = write_images(tmp_path / "failures", {"cat": 6, "dog": 6, "ship": 6}, seed=12)
    rows = {}
    for batch in (256, 4):
        monkeypatch.setattr(vitedit.evaluate, "DEFAULT_BATCH", batch)
        ws = tmp_path / f"ws{batch}"
        assert cli("locate", failures, *model_args(tiny_weights, labels_file), "-w", ws, "--json")[0] == 0
        rows[batch] = load_tensors(ws / "scores.safetensors")[0]
        assert json.loads((ws / "workspace.json").read_text())["failing"] == \
            json.loads((tmp_path / "ws256" / "workspace.json").read_text())["failing"]
    for p, t in rows[256].items():
        torch.testing.assert_close(rows[4][p], t, atol=1e-7, rtol=1e-5)


def test_apply_and_report_results_do_not_depend_on_the_cache_budget(tmp_path, tiny_weights, labels_file,
                                                                    small_batches, monkeypatch):
    failures = write_images(tmp_path / "failures", {"cat": 6, "dog": 6, "T-shirt_top": 6}, seed=1)
    locality = write_images(tmp_path / "locality", {"a": 7, "b": 6}, seed=2)
    ws = tmp_path / "ws"
    assert cli("locate", failures, *model_args(tiny_weights, labels_file), "-w", ws, "--json")[0] == 0
    results = {}
    for budget in ("1024", "0"):
        monkeypatch.setenv("VITEDIT_CACHE_BUDGET_MB", budget)
        runs = {}
        for args in (["apply", "--max-steps", "3", "--lr", "1e-3", "--locality", locality],
                     ["report", "--sparsities", "0.05,0.25", "--max-steps", "2", "--locality", locality]):
            code, out, err = cli(*args, "-w", ws, "--json")
            assert code == 0, err
            runs[args[0]] = json.loads(out)
        results[budget] = runs
    assert results["0"] == results["1024"]
    assert results["0"]["apply"]["locality_images"] == 13


@pytest.mark.parametrize("command", [["apply", "--max-steps", "1"], ["report", "--sparsities", "0.05"]])
@pytest.mark.parametrize("how", ["moved", "changed"])
def test_failure_images_moved_or_changed_after_locate_exit_8(tmp_path, tiny_weights, labels_file, command, how):
    failures = write_images(tmp_path / "failures", {"cat": 6, "dog": 6, "ship": 6}, seed=13)
    ws = tmp_path / "ws"
    assert cli("locate", failures, *model_args(tiny_weights, labels_file), "-w", ws, "--json")[0] == 0
    state = json.loads((ws / "workspace.json").read_text())
    victim = Path(state["images"][state["failing"][-1]]["path"])
    if how == "moved":
        shutil.move(victim, tmp_path / "elsewhere.png")
    else:
        write_images(tmp_path / "other", {"x": 1}, seed=99)
        shutil.copyfile(tmp_path / "other" / "x" / "img_000.png", victim)
    code, out, err = cli(*command, "-w", ws, "--json")
    assert code == 8 and out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert str(victim) in lines[0] and "vitedit locate" in lines[0]
    assert ("missing" if how == "moved" else "changed") in lines[0]
