"""Many edits in one model: the workspace's edit stack through the CLI (locate/apply --on-top,
history, revert) and its invariants: stacking then reverting gives the base back bit for bit, the
combined patch equals the stack applied in order, overlapping reverts are refused, a history for
another model is refused, an interrupted apply leaves the previous history intact.

timm's ``test_vit`` with a local weights file and generated image folders, CPU, offline.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_images
from safetensors.torch import load_file
from test_cli import cli, cli_json, model_args, one_error_line

from vitedit.edit import Patch

FAST = ["--max-steps", "3", "--lr", "1e-3", "--objective", "plain"]


@pytest.fixture(scope="module")
def stacked(tmp_path_factory, tiny_weights, labels_file):
    """Two edits stacked: group A from the base, group B on top; the state after each is kept."""
    root = tmp_path_factory.mktemp("history")
    a = write_images(root / "a", {"cat": 6, "dog": 6}, seed=11)
    b = write_images(root / "b", {"T-shirt_top": 6, "ship": 6}, seed=12)
    ws = root / "ws"
    cli_json("locate", a, *model_args(tiny_weights, labels_file), "-w", ws, "--locator", "random")
    first = cli_json("apply", "-w", ws, "--sparsity", "0.05", *FAST)
    after_a = load_file(str(ws / "edited.safetensors"))
    shutil.copytree(ws, root / "ws-after-a")
    located = cli_json("locate", b, *model_args(tiny_weights, labels_file), "-w", ws, "--locator", "random",
                       "--on-top", "--seed", "1")
    second = cli_json("apply", "-w", ws, "--sparsity", "0.05", *FAST)  # follows locate --on-top
    return {"root": root, "ws": ws, "first": first, "second": second, "located": located, "after_a": after_a,
            "base": load_file(str(tiny_weights)), "a": a, "b": b}


def test_on_top_stacks_and_remeasures_the_earlier_edit(stacked):
    assert stacked["located"]["on_top_of"] == 1
    second = stacked["second"]
    assert second["on_top_of"] == 1 and second["history_edits"] == 2 and second["history_index"] == 2
    (earlier,) = second["interference"]
    assert earlier["index"] == 1 and earlier["success_images"] == stacked["first"]["edit_images"]
    assert earlier["generalization_at_the_time"] == stacked["first"]["generalization"]
    hist = cli_json("history", "-w", stacked["ws"])
    assert [e["index"] for e in hist["edits"]] == [1, 2]
    assert hist["edits"][1]["interference"] == second["interference"]


def test_combined_patch_equals_the_stack_applied_in_order(stacked):
    ws = stacked["ws"]
    state = {k: v.clone() for k, v in stacked["base"].items()}
    for name in ("001", "002"):
        p, _ = Patch.load(ws / "patches" / f"{name}.safetensors")
        for s in p.sites:
            w = state[s.param]
            assert torch.equal(w.index_select(s.dim, p.indices[s.param]), p.old[s.param])
            w.index_copy_(s.dim, p.indices[s.param], p.new[s.param])
    combined, _ = Patch.load(ws / "patch.safetensors")
    via_combined = {k: v.clone() for k, v in stacked["base"].items()}
    for s in combined.sites:
        via_combined[s.param].index_copy_(s.dim, combined.indices[s.param], combined.new[s.param])
    edited = load_file(str(ws / "edited.safetensors"))
    for k in state:
        assert torch.equal(state[k], via_combined[k]) and torch.equal(state[k], edited[k]), k
    assert any(not torch.equal(edited[k], stacked["after_a"][k]) for k in edited)  # edit 2 changed something


def test_stack_then_revert_gives_each_earlier_state_bit_for_bit(stacked, tmp_path):
    ws = shutil.copytree(stacked["ws"], tmp_path / "ws")
    (ws / "lock").unlink(missing_ok=True)
    assert cli_json("revert", "-w", ws)["remaining"] == [1]
    edited = load_file(str(ws / "edited.safetensors"))
    assert set(edited) == set(stacked["after_a"])
    assert all(torch.equal(edited[k], stacked["after_a"][k]) for k in edited)
    assert not (ws / "patches" / "002.safetensors").exists()
    assert cli_json("revert", "-w", ws)["remaining"] == []
    assert not (ws / "edited.safetensors").exists() and not (ws / "patch.safetensors").exists()
    code, _, err = cli("revert", "-w", ws)
    assert code == 2 and "no edit to revert" in one_error_line(err)


def test_reverting_an_edit_a_later_one_overlaps_is_refused(tmp_path, tiny_weights, labels_file):
    a = write_images(tmp_path / "a", {"cat": 6, "dog": 6}, seed=11)
    b = write_images(tmp_path / "b", {"T-shirt_top": 6, "ship": 6}, seed=12)
    ws = tmp_path / "ws"
    cli_json("locate", a, *model_args(tiny_weights, labels_file), "-w", ws, "--locator", "random")
    cli_json("apply", "-w", ws, "--sparsity", "0.5", *FAST)
    cli_json("locate", b, *model_args(tiny_weights, labels_file), "-w", ws, "--locator", "random", "--on-top",
             "--seed", "3")
    cli_json("apply", "-w", ws, "--sparsity", "0.5", "--on-top", *FAST)  # half the units each: they overlap
    before = (ws / "history.json").read_bytes()
    code, out, err = cli("revert", "1", "-w", ws)
    assert code == 2 and "edit 1 cannot be reverted alone: edit 2" in one_error_line(err)
    assert (ws / "history.json").read_bytes() == before
    code, _, err = cli("revert", "7", "-w", ws)
    assert code == 2 and "there is no edit 7" in one_error_line(err)


def test_disjoint_edits_share_no_unit_and_each_reverts_alone(tmp_path, tiny_weights, labels_file):
    """--disjoint: the same two half-the-units edits as above, but the second takes only units the
    first left alone, so the first can be reverted on its own, leaving exactly the second edit on the
    base model (bit for bit); --disjoint without --on-top is refused."""
    a = write_images(tmp_path / "a", {"cat": 6, "dog": 6}, seed=11)
    b = write_images(tmp_path / "b", {"T-shirt_top": 6, "ship": 6}, seed=12)
    ws = tmp_path / "ws"
    cli_json("locate", a, *model_args(tiny_weights, labels_file), "-w", ws, "--locator", "random")
    code, _, err = cli("apply", "-w", ws, "--sparsity", "0.5", "--disjoint", *FAST)
    assert code == 2 and "--disjoint" in one_error_line(err) and "--on-top" in one_error_line(err)
    first = cli_json("apply", "-w", ws, "--sparsity", "0.5", *FAST)
    cli_json("locate", b, *model_args(tiny_weights, labels_file), "-w", ws, "--locator", "random", "--on-top",
             "--seed", "3")
    second = cli_json("apply", "-w", ws, "--sparsity", "0.5", "--on-top", "--disjoint", *FAST)
    assert second["disjoint"] is True and second["units_excluded"] == first["units_edited"]
    assert second["units_edited"] == first["units_edited"]
    p1, _ = Patch.load(ws / "patches" / "001.safetensors")
    p2, _ = Patch.load(ws / "patches" / "002.safetensors")
    for param, ix in p2.indices.items():
        assert not set(ix.tolist()) & set(p1.indices.get(param, torch.tensor([], dtype=torch.long)).tolist())
    assert cli_json("revert", "1", "-w", ws)["remaining"] == [2]
    edited = load_file(str(ws / "edited.safetensors"))
    want = load_file(str(tiny_weights))
    for s in p2.sites:
        want[s.param].index_copy_(s.dim, p2.indices[s.param], p2.new[s.param])
    for k in want:
        assert torch.equal(edited[k], want[k]), k
    cli_json("locate", a, *model_args(tiny_weights, labels_file), "-w", ws, "--locator", "random", "--on-top")
    code, _, err = cli("apply", "-w", ws, "--sparsity", "0.6", "--on-top", "--disjoint", *FAST)
    assert code == 2 and "not changed by earlier edits" in one_error_line(err)
    # the report's sweep skips the sparsities that do not fit, and says so
    rep = cli_json("report", "-w", ws, "--on-top", "--disjoint", "--sparsities", "0.05,0.6", *FAST)
    assert {p["sparsity"] for p in rep["points"]} == {0.05}
    assert any("sparsities 0.6 were skipped" in n for n in rep["notes"])


def test_a_history_made_for_another_model_is_refused(stacked, tmp_path):
    ws = shutil.copytree(stacked["ws"], tmp_path / "ws")
    (ws / "lock").unlink(missing_ok=True)
    data = json.loads((ws / "history.json").read_text())
    data["model"]["weights_sha256"] = "f" * 64
    (ws / "history.json").write_text(json.dumps(data))
    for args in (["history"], ["revert"], ["export", tmp_path / "m.onnx"]):
        code, out, err = cli(*args, "-w", ws)
        assert code == 8 and "edit history" in one_error_line(err), args


def test_apply_from_base_after_locate_on_top_is_refused(stacked, tmp_path):
    ws = shutil.copytree(stacked["ws"], tmp_path / "ws")
    (ws / "lock").unlink(missing_ok=True)
    code, _, err = cli("apply", "-w", ws, "--from-base", *FAST)
    assert code == 2 and "leave out --from-base" in one_error_line(err)


def test_an_interrupted_apply_leaves_the_previous_history_intact(stacked, tmp_path, monkeypatch):
    from vitedit.history import History

    ws = shutil.copytree(stacked["root"] / "ws-after-a", tmp_path / "ws")
    (ws / "lock").unlink(missing_ok=True)
    history_before = (ws / "history.json").read_bytes()
    combined_before = (ws / "patch.safetensors").read_bytes()
    cli_json("locate", stacked["b"], "-w", ws, "--locator", "random", "--on-top", "--seed", "1",
             *model_args(*_model_files(stacked)))

    def crash(self, data):
        raise KeyboardInterrupt  # the process dies at the history's commit point

    monkeypatch.setattr(History, "write", crash)
    code, _, _ = cli("apply", "-w", ws, "--on-top", *FAST)
    assert code == 130
    monkeypatch.undo()
    assert (ws / "history.json").read_bytes() == history_before
    assert (ws / "patch.safetensors").read_bytes() != combined_before  # the derived file got ahead ...
    res = cli_json("export", tmp_path / "m.onnx", "-w", ws)             # ... and is rebuilt from the history
    assert res["base"] is False
    assert (ws / "patch.safetensors").read_bytes() == combined_before or json.loads(
        (ws / "history.json").read_text())["combined_sha256"] == _sha(ws / "patch.safetensors")
    edited = load_file(str(ws / "edited.safetensors"))
    assert all(torch.equal(edited[k], stacked["after_a"][k]) for k in edited)


def _model_files(stacked):
    state = json.loads((stacked["ws"] / "workspace.json").read_text())["model"]
    from pathlib import Path

    return Path(state["weights"]), Path(state["labels_file"])


def _sha(path):
    from vitedit.artifacts import sha256_file

    return sha256_file(path)


def test_on_top_holds_the_earlier_edits_images_and_says_which_are_gone(stacked, tmp_path):
    """--anchor-weight: the earlier edits' edit images (as recorded, checked by hash) are held to the
    stacked model's predictions; a changed one is left out with a note, and the anchor term really
    changes the edit."""
    ws = shutil.copytree(stacked["root"] / "ws-after-a", tmp_path / "ws")
    (ws / "lock").unlink(missing_ok=True)
    cli_json("locate", stacked["b"], "-w", ws, "--locator", "random", "--on-top", "--seed", "1",
             *model_args(*_model_files(stacked)))
    unheld = shutil.copytree(ws, tmp_path / "ws-unheld")
    viewed = shutil.copytree(ws, tmp_path / "ws-viewed")
    held = cli_json("apply", "-w", ws, "--sparsity", "0.05", "--on-top", *FAST, "--anchor-weight", "50")
    assert held["anchor_images"] == stacked["first"]["edit_images"] > 0
    assert held["edit_config"]["anchor_weight"] == 50
    free = cli_json("apply", "-w", unheld, "--sparsity", "0.05", "--on-top", *FAST, "--anchor-weight", "0")
    assert free["anchor_images"] == 0
    # --anchor-views: the same images held, with views of each too; the edit changes again
    views = cli_json("apply", "-w", viewed, "--sparsity", "0.05", "--on-top", *FAST, "--anchor-weight", "50",
                     "--anchor-views", "2")
    assert views["anchor_images"] == held["anchor_images"] and views["edit_config"]["anchor_views"] == 2
    new = {n: Patch.load(w / "patches" / "002.safetensors")[0].new
           for n, w in (("held", ws), ("free", unheld), ("viewed", viewed))}
    assert any(not torch.equal(new["held"][p], new["free"][p]) for p in new["held"])
    assert any(not torch.equal(new["held"][p], new["viewed"][p]) for p in new["held"])

    # one of edit 1's images changed since: it is not held, and the note says so
    again = shutil.copytree(stacked["root"] / "ws-after-a", tmp_path / "ws-again")
    (again / "lock").unlink(missing_ok=True)
    recorded = json.loads((again / "history.json").read_text())["edits"][0]["edit_images"]
    a_copy = shutil.copytree(stacked["a"], tmp_path / "a-copy")
    first = recorded[0]
    moved = a_copy / Path(first["path"]).relative_to(stacked["a"])
    hist = json.loads((again / "history.json").read_text())
    for e in hist["edits"][0]["edit_images"]:   # point the history at the copy, then change one image
        e["path"] = str(a_copy / Path(e["path"]).relative_to(stacked["a"]))
    (again / "history.json").write_text(json.dumps(hist))
    moved.write_bytes(moved.read_bytes() + b"\0")
    cli_json("locate", stacked["b"], "-w", again, "--locator", "random", "--on-top", "--seed", "1",
             *model_args(*_model_files(stacked)))
    res = cli_json("apply", "-w", again, "--sparsity", "0.05", "--on-top", *FAST, "--anchor-weight", "50")
    assert res["anchor_images"] == len(recorded) - 1
    assert any("1 of the earlier edits' images are gone or changed" in n for n in res["notes"])


def test_history_tables_every_edits_retained_share_and_plots_it(stacked, tmp_path):
    plot = tmp_path / "history.png"
    res = cli_json("history", "-w", stacked["ws"], "--plot", plot)
    table = res["interference_table"]
    assert [r["edits"] for r in table] == [1, 2] and res["plot"] == str(plot)
    assert table[0]["retained"] == {"1": 1.0} or table[0]["retained"] == {1: 1.0}
    (earlier,) = stacked["second"]["interference"]
    after_two = {int(k): v for k, v in table[1]["retained"].items()}
    assert after_two == {1: earlier["retained"], 2: 1.0}
    assert table[1]["check_accuracy"] == stacked["second"]["cumulative"].get("accuracy_after")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = cli("history", "-w", stacked["ws"])
    assert code == 0 and "Retained generalization of every edit" in out
