"""``vitedit-lab stack`` (vitedit/lab/sequential.py): the protocol's invariants on a small run
(two bundled groups, the plain editor, one order) and the summary's arithmetic on made-up rows."""

import json

import pytest

from vitedit.errors import UsageError
from vitedit.lab.sequential import SequentialConfig, run_sequential, summarize


def test_config_refuses_unknown_editors_and_empty_runs(tmp_path):
    with pytest.raises(UsageError, match="unknown fancy"):
        SequentialConfig(editors=("plain", "fancy"), out=tmp_path)
    with pytest.raises(UsageError, match="at least 1"):
        SequentialConfig(orders=0, out=tmp_path)
    with pytest.raises(UsageError, match="choose base or current"):
        SequentialConfig(preserve_targets="edited", out=tmp_path)


def _row(editor, arm, step, order, retained, drop, flips, worst=None):
    groups = [{"group": "a", "retained": retained, "still_fixed": retained, "generalization": 0.5},
              {"group": "b", "retained": worst if worst is not None else retained, "still_fixed": 1.0,
               "generalization": 0.5}]
    return {"editor": editor, "arm": arm, "step": step, "order": order, "groups": groups,
            "mean_retained": sum(g["retained"] for g in groups) / 2,
            "mean_still_fixed": sum(g["still_fixed"] for g in groups) / 2, "mean_generalization": 0.5,
            "accuracy_drop": drop, "flip_rate": flips, "check_accuracy": 0.9 - drop / 100, "locality": 0.99}


def test_summary_takes_the_final_step_of_each_order_and_the_worst_group():
    singles = {"plain": {"a": {"generalization": 0.6, "flip_rate": 0.02},
                         "b": {"generalization": 0.4, "flip_rate": 0.04}}}
    rows = [_row("plain", "sequential", 1, 0, 1.0, 0.1, 0.01),   # not final: ignored
            _row("plain", "sequential", 2, 0, 0.8, 2.0, 0.05, worst=0.6),
            _row("plain", "sequential", 2, 1, 0.6, 4.0, 0.07),
            _row("plain", "batch", 2, None, 0.9, 1.0, 0.03)]
    out = {s["arm"]: s for s in summarize(rows, singles, n_groups=2)}
    assert out["single"]["mean_generalization"] == pytest.approx(0.5)
    assert out["single"]["flip_rate"] == pytest.approx(0.03)
    seq = out["sequential"]
    assert seq["runs"] == 2
    assert seq["mean_retained"] == pytest.approx((0.7 + 0.6) / 2)
    assert seq["accuracy_drop"] == pytest.approx(3.0)
    assert seq["flip_rate"] == pytest.approx(0.06)
    assert seq["accuracy_drop_ci95"] > 0
    assert seq["worst_group_retained"] == pytest.approx(0.6)
    assert out["batch"]["runs"] == 1 and out["batch"]["mean_retained"] == pytest.approx(0.9)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("seq")
    cfg = SequentialConfig(editors=("plain",), edit_images=5, orders=1, groups=("bag", "ankle-boot"), out=out)
    return run_sequential(cfg, lambda *a: None), out


@pytest.mark.slow
def test_disjoint_stack_never_edits_a_unit_twice(tmp_path):
    """--disjoint: the second edit's units are all units the first edit did not change (and as many
    as the sparsity asks); the row records how many units it shared with the earlier edits (none)."""
    cfg = SequentialConfig(editors=("plain",), edit_images=5, orders=1, groups=("bag", "ankle-boot"), out=tmp_path,
                           batch=False, disjoint=True, sparsity=0.2)
    res = run_sequential(cfg, lambda *a: None)
    seq = sorted((r for r in res["rows"] if r["arm"] == "sequential"), key=lambda r: r["step"])
    assert [r["shared_units"] for r in seq] == [0, 0]
    assert seq[0]["units"] == seq[1]["units"] > 0
    assert res["config"]["disjoint"] is True


@pytest.mark.slow
def test_small_sequential_run_keeps_the_protocol(small_run):
    res, out = small_run
    assert set(res["groups"]) == {"bag", "ankle-boot"}
    saved = json.loads((out / "sequential.json").read_text())
    assert saved["rows"] == res["rows"] and saved["summary"] == res["summary"]
    assert (out / "sequential.png").stat().st_size > 0
    assert not (out / "sequential.partial.json").exists()   # removed once the whole run is written

    seq = sorted((r for r in res["rows"] if r["arm"] == "sequential"), key=lambda r: r["step"])
    batch = [r for r in res["rows"] if r["arm"] == "batch"]
    assert [r["step"] for r in seq] == [1, 2] and len(batch) == 1
    # every earlier edit is re-measured after each edit: step k lists the k groups edited so far
    assert [[g["group"] for g in r["groups"]] for r in seq] == [[seq[0]["group"]], [seq[0]["group"], seq[1]["group"]]]
    assert {g["group"] for g in batch[0]["groups"]} == {"bag", "ankle-boot"}
    # without --disjoint the hypernetwork picks many of the same units for both groups (what
    # test_disjoint_stack_never_edits_a_unit_twice rules out)
    assert seq[0]["shared_units"] == 0 and 0 < seq[1]["shared_units"] <= seq[1]["units"]
    single = res["singles"]["plain"]
    for r in seq + batch:
        assert r["accuracy_drop"] == pytest.approx(100 * (res["base_check_accuracy"] - r["check_accuracy"]), abs=1e-3)
        assert 0 <= r["flip_rate"] <= 1 and 0 <= r["locality"] <= 1
        for g in r["groups"]:
            assert g["single_generalization"] == single[g["group"]]["generalization"]
            if g["retained"] is not None:
                assert g["retained"] == pytest.approx(g["generalization"] / g["single_generalization"])
            assert 0 <= g["still_fixed"] <= 1
    # the plain editor draws nothing at random: the first edit of a stack starts from the base model
    # with the same mask and images as that group's single edit, so it is that edit exactly
    first = seq[0]["groups"][0]
    assert first["generalization"] == single[first["group"]]["generalization"]
    assert first["still_fixed"] == 1.0 and first["success"] == single[first["group"]]["success"]
    assert seq[0]["flip_rate"] == single[first["group"]]["flip_rate"]
    final = {s["arm"]: s for s in res["summary"]}
    assert final["sequential"]["accuracy_drop"] == pytest.approx(seq[-1]["accuracy_drop"])
    assert final["batch"]["mean_retained"] == pytest.approx(batch[0]["mean_retained"])


@pytest.mark.slow
def test_each_group_is_scored_on_its_own_held_out_failures(small_run):
    """A group's held-out set is its own failure folder minus its edit images, and every
    generalization figure is a share of exactly that many images."""
    from vitedit.demo import examples

    res, _ = small_run
    sizes = {g["group"]: g["failures"] for g in examples()}
    assert res["held_out"] == {g: sizes[g] - 5 for g in ("bag", "ankle-boot")}
    for r in res["rows"]:
        for g in r["groups"]:
            n = res["held_out"][g["group"]]
            assert g["generalization"] * n == pytest.approx(round(g["generalization"] * n), abs=1e-6)


def _preserve_with(tmp_path, extra: list) -> "Path":
    """A small preserve folder: three bundled preserve images and copies of ``extra``."""
    import shutil

    from vitedit.models import DEFAULT_ASSETS

    folder = tmp_path / "preserve"
    folder.mkdir()
    for i, src in enumerate(sorted((DEFAULT_ASSETS / "preserve").rglob("*.png"))[:3] + list(extra)):
        shutil.copyfile(src, folder / f"{i}-{src.name}")
    return folder


@pytest.mark.parametrize("overlap", ["locality folder", "locality image", "group image", "check image"])
def test_the_preserve_set_is_checked_apart_from_every_measured_set(tmp_path, overlap):
    """The preserve set may share no folder and no image with the check set, the locality set or a
    failure group taking part (apply's rule; the sequential run once checked the check set only)."""
    from vitedit.errors import InputDataError
    from vitedit.models import DEFAULT_ASSETS

    def first(folder):
        return sorted(folder.rglob("*.png"))[:1]

    if overlap == "locality folder":
        preserve, error, needle = DEFAULT_ASSETS / "sensitive", UsageError, "is the locality set (--locality) folder"
    elif overlap == "locality image":
        preserve, error, needle = (_preserve_with(tmp_path, first(DEFAULT_ASSETS / "sensitive")), InputDataError,
                                   "in the locality set (--locality) is the same image as")
    elif overlap == "group image":
        preserve, error, needle = (_preserve_with(tmp_path, first(DEFAULT_ASSETS / "failures" / "bag")),
                                   InputDataError, "in the failures (bag) is the same image as")
    else:
        preserve, error, needle = (_preserve_with(tmp_path, first(DEFAULT_ASSETS / "test")), InputDataError,
                                   "in the check set (--check) is the same image as")
    cfg = SequentialConfig(editors=("local",), edit_images=5, orders=1, groups=("bag", "ankle-boot"),
                           preserve=preserve, out=tmp_path / "out")
    with pytest.raises(error, match=needle.replace("(", r"\(").replace(")", r"\)")):
        run_sequential(cfg, lambda *a: None)
    assert not (tmp_path / "out" / "sequential.partial.json").exists()  # refused before any edit

