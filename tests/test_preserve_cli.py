"""The preserve and check sets through the command line: what apply, report and `--sparsity auto`
report, and the one-line errors (with their documented exit codes) for folders that cannot be used.

timm's ``test_vit`` with a local weights file and generated image folders, CPU, offline.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import write_images
from test_cli import cli, cli_json, model_args, one_error_line


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_weights, labels_file):
    """A located workspace plus preserve (unlabeled) and check (labeled) folders."""
    root = tmp_path_factory.mktemp("preserve-job")
    failures = write_images(root / "failures", {"cat": 8, "dog": 8, "T-shirt_top": 8}, seed=1)
    preserve = write_images(root / "preserve", {"p": 12, "q": 12}, seed=3)
    check = write_images(root / "check", {"cat": 5, "dog": 5, "ship": 5}, seed=4)
    cli_json("locate", failures, *model_args(tiny_weights, labels_file), "-w", root / "ws", "--locator", "random")
    return {"root": root, "ws": root / "ws", "preserve": preserve, "check": check, "failures": failures}


def test_apply_reports_accuracy_drop_and_flip_rate_and_uses_the_preserve_set(ws):
    res = cli_json("apply", "-w", ws["ws"], "--max-steps", "3", "--lr", "1e-3", "--preserve", ws["preserve"],
                   "--check", ws["check"])
    assert res["objective"] == "local" and res["edit_config"]["preserve_weight"] > 0
    assert res["preserve_images"] == 24 and res["check_images"] == 15
    for k in ("accuracy_before", "accuracy_after", "flip_rate"):
        assert 0.0 <= res[k] <= 1.0
    assert res["accuracy_drop"] == pytest.approx(100 * (res["accuracy_before"] - res["accuracy_after"]), abs=1e-3)
    assert res["base"]["check_accuracy"] == res["accuracy_before"]
    lo, hi = res["accuracy_drop_ci95"]
    assert lo < res["accuracy_drop"] < hi and hi - lo > 10  # 15 images: an interval wider than 10 points
    lo, hi = res["flip_rate_ci95"]
    assert lo <= res["flip_rate"] <= hi
    assert not any("nothing held" in n for n in res["notes"])
    # 15 check images cannot resolve the 0.5-point budget, and apply says so
    assert any(n.startswith("the check set is too small to resolve a 0.5-point accuracy budget: its 15 images")
               for n in res["notes"])
    meta = json.loads((ws["ws"] / "patch.json").read_text())
    assert meta["metrics"]["flip_rate"] == res["flip_rate"] and meta["preserve"] == str(ws["preserve"])
    assert meta["metrics"]["accuracy_drop_ci95"] == res["accuracy_drop_ci95"]
    code, out, err = cli("apply", "-w", ws["ws"], "--max-steps", "3", "--lr", "1e-3", "--preserve", ws["preserve"],
                         "--check", ws["check"])
    assert code == 0 and "95% CI" in out and "check set is too small" in " ".join(err.split())


def test_without_a_preserve_set_the_edit_runs_and_says_nothing_held_the_model(ws):
    res = cli_json("apply", "-w", ws["ws"], "--max-steps", "2", "--lr", "1e-3")
    assert res["preserve_images"] == 0 and res["edit_config"]["preserve_weight"] == 0
    assert res["edit_config"]["nullspace_threshold"] is None
    assert any("nothing held the rest of the model in place" in n for n in res["notes"])
    assert any("no check set" in n for n in res["notes"]) and res["accuracy_drop"] is None
    code, out, err = cli("apply", "-w", ws["ws"], "--max-steps", "2", "--lr", "1e-3")
    assert code == 0 and "nothing held the rest of the model in place" in err


def test_plain_objective_is_the_papers_editor(ws):
    res = cli_json("apply", "-w", ws["ws"], "--max-steps", "2", "--lr", "1e-3", "--objective", "plain",
                   "--preserve", ws["preserve"], "--check", ws["check"])
    cfg = res["edit_config"]
    assert cfg["objective"] == "plain" and cfg["preserve_weight"] == 0 and cfg["nullspace_threshold"] is None
    assert cfg["augment"] == 0 and cfg["stop_margin"] is None and cfg["loss_threshold"] == 0.01
    # it holds nothing in place, so it reads no preserve set and its provenance names none
    assert res["preserve_images"] == 0 and res["preserve_source"] is None
    assert json.loads((ws["ws"] / "patch.json").read_text())["preserve"] is None
    code, _, err = cli("apply", "-w", ws["ws"], "--editor", "plain", "--preserve", ws["check"], "--check", ws["check"])  # still checked
    assert code == 2 and "preserve" in one_error_line(err)


def test_report_sweeps_preservation_weights_and_states_its_rule(ws):
    res = cli_json("report", "-w", ws["ws"], "--sparsities", "0.05,0.25", "--preserve-weights", "1,10",
                   "--max-steps", "2", "--lr", "1e-3", "--preserve", ws["preserve"], "--check", ws["check"],
                   "--plot", ws["root"] / "t.png")
    own = sorted((p["sparsity"], p["preserve_weight"]) for p in res["points"] if p["locator"] == "random")
    assert own == [(0.05, 1.0), (0.05, 10.0), (0.25, 1.0), (0.25, 10.0)]  # random is the workspace's locator here
    rec = res["recommended"]
    assert "success 100% and accuracy drop <= 0.5 points" in rec["rule"] or "no random edit reached" in rec["rule"]
    ok = [p for p in res["points"] if p["success"] == 1.0 and p["accuracy_drop"] <= 0.5]
    assert rec["qualifies"] == bool(ok)
    if ok:
        assert rec["generalization"] == max(p["generalization"] for p in ok)
    assert (ws["root"] / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_sparsity_auto_chooses_on_a_validation_half(ws):
    res = cli_json("apply", "-w", ws["ws"], "--sparsity", "auto", "--max-steps", "2", "--lr", "1e-3",
                   "--preserve", ws["preserve"], "--check", ws["check"])
    auto = res["auto"]
    assert res["sparsity"] in {p["sparsity"] for p in auto["candidates"]}
    assert auto["validation_images"] + res["holdout_images"] == json.loads(
        (ws["ws"] / "workspace.json").read_text())["failing"].__len__() - res["edit_images"]
    assert "not used to choose" in res["generalization_source"]


@pytest.mark.parametrize("case", ["empty preserve", "preserve is check", "preserve holds a check image",
                                  "check has an unknown class", "missing preserve"])
def test_unusable_preserve_or_check_folders_get_one_line_and_an_exit_code(ws, tmp_path, case):
    preserve, check = ws["preserve"], ws["check"]
    expect_code, needle = 3, None
    if case == "empty preserve":
        preserve = tmp_path / "empty"
        preserve.mkdir()
        needle = "holds no image files"
    elif case == "preserve is check":
        preserve, expect_code, needle = check, 2, "must not be the ones it is measured on"
    elif case == "preserve holds a check image":
        preserve = tmp_path / "p"
        shutil.copytree(ws["preserve"], preserve)
        shutil.copyfile(next((check / "cat").iterdir()), preserve / "p" / "copy.png")
        needle = "is the same image as"
    elif case == "check has an unknown class":
        check = tmp_path / "c"
        shutil.copytree(ws["check"], check)
        (check / "ship").rename(check / "submarine")
        needle = "submarine"
    else:
        preserve, needle = tmp_path / "nowhere", "does not exist"
    before = {p.name: p.read_bytes() for p in ws["ws"].iterdir() if p.is_file() and p.name != "lock"}
    code, out, err = cli("apply", "-w", ws["ws"], "--max-steps", "1", "--preserve", preserve, "--check", check)
    assert code == expect_code, err
    assert needle in one_error_line(err) and out == ""
    after = {p.name: p.read_bytes() for p in ws["ws"].iterdir() if p.is_file() and p.name != "lock"}
    assert after == before  # nothing the user had is changed


def test_a_preserve_set_over_the_cache_budget_is_cut_to_a_seeded_subset(ws, monkeypatch):
    monkeypatch.setenv("VITEDIT_CACHE_BUDGET_MB", "0.05")  # ~52 KB: a few test_vit images' tokens
    res = cli_json("apply", "-w", ws["ws"], "--max-steps", "1", "--lr", "1e-3", "--preserve", ws["preserve"],
                   "--check", ws["check"])
    assert 1 <= res["preserve_images"] < 24
    assert any(f"a seeded {res['preserve_images']} of its 24 images were used" in n for n in res["notes"])


def test_an_edit_reports_every_step_with_its_loss(ws):
    """Long edits (a real ViT at 224 px runs seconds a step) show progress: one call per step."""
    from vitedit.pipeline import ApplyConfig, ExperimentOptions, run_apply

    seen = []
    run_apply(ApplyConfig(ws["ws"], 0.05, ExperimentOptions(edit={"max_steps": 4, "lr": 1e-3}, objective="plain")),
              lambda desc, done, total, info="": seen.append((desc, done, total, info)))
    steps = [s for s in seen if s[0] == "editing" and s[3].startswith("loss")]
    assert [s[1] for s in steps] == list(range(1, len(steps) + 1)) and 1 <= len(steps) <= 4
    assert all(s[2] == 4 for s in steps)


def test_on_top_the_preserve_set_keeps_the_base_models_predictions_and_the_anchors_the_stacks(ws, tmp_path):
    """A local edit on top of a stack: the preserve targets are the base model's (not the stack's),
    the anchor set is edit 1's images with the stack's predictions."""
    import torch

    from vitedit.jobs.experiment import ExperimentOptions, _prepare
    from vitedit.preserve import build_preserve_set
    from vitedit.workspace import Workspace

    work = shutil.copytree(ws["ws"], tmp_path / "ws")
    (work / "lock").unlink(missing_ok=True)
    fast = ["--max-steps", "5", "--lr", "1e-2", "--preserve", ws["preserve"], "--check", ws["check"]]
    first = cli_json("apply", "-w", work, *fast)
    state = json.loads((work / "workspace.json").read_text())["model"]
    cli_json("locate", ws["failures"], "-w", work, "--locator", "random", "--on-top", "--seed", "2",
             *model_args(Path(state["weights"]), Path(state["labels_file"])))
    job = _prepare(Workspace(work), ExperimentOptions(preserve=ws["preserve"], check=ws["check"], on_top=True),
                   lambda *a: None)
    assert job.stacked == 1
    # job.loaded.model holds the stack here
    stack_targets = build_preserve_set(job.loaded.model, job.sites, tokens=job.preserve.tokens).base_log_probs
    from vitedit.history import History

    (p,) = History(Workspace(work)).patches(job.loaded.identity)
    p.revert(job.loaded.model)   # back to the base weights
    base = build_preserve_set(job.loaded.model, job.sites, tokens=job.preserve.tokens)
    assert torch.allclose(job.preserve.base_log_probs, base.base_log_probs, atol=1e-5)
    assert not torch.allclose(job.preserve.base_log_probs, stack_targets, atol=1e-4)  # the stack did move them
    assert len(job.anchors) == first["edit_images"]
