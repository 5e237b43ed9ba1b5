"""`vitedit benchmark`: aggregation, the matched-locality comparison, rerun checks, and a small real run."""

from __future__ import annotations

import json

import pytest

from vitedit.lab.benchmark import BenchmarkConfig, _interp, aggregate, compare, matched_locality, run_benchmark
from vitedit.errors import ArtifactError, UsageError


def _row(group, method, setting, gen, loc, k=1):
    return {"group": group, "edit_images": k, "method": method, "setting": setting, "generalization": gen,
            "locality": loc}


def test_interp_is_linear_inside_and_undefined_outside():
    curve = [(0.8, 0.2), (0.6, 0.4), (0.4, 0.8)]
    assert _interp(curve, 0.7) == pytest.approx(0.3)
    assert _interp(curve, 0.5) == pytest.approx(0.6)
    assert _interp(curve, 0.4) == pytest.approx(0.8)
    assert _interp(curve, 0.9) is None and _interp(curve, 0.3) is None
    assert _interp([], 0.5) is None


def test_matched_locality_gain_against_the_best_baseline_averaged_over_groups():
    summary = []
    for group, shift in (("a", 0.0), ("b", 0.1)):
        # Baselines: straight lines gen = 1 - loc (random) and gen = 1.1 - loc (gradient, better).
        for loc in (0.3, 0.5, 0.7, 0.9):
            summary.append(_row(group, "random", loc, 1.0 - loc, loc))
            summary.append(_row(group, "gradient", loc, 1.1 - loc, loc))
        # The method sits 0.05 + shift above the gradient curve at locality 0.6.
        summary.append(_row(group, "hypernet", 0.05, 1.1 - 0.6 + 0.05 + shift, 0.6))
        # A point outside every baseline's locality range is skipped.
        summary.append(_row(group, "hypernet", 0.5, 0.99, 0.95))
    summary.append(_row("all", "hypernet", 0.05, 0.0, 0.6))  # overall rows are not used
    (row,) = matched_locality(summary)
    assert row["setting"] == 0.05 and row["groups"] == 2
    assert row["best_baseline"] == "gradient"
    assert row["gain"] == pytest.approx(0.10, abs=1e-4)          # mean of 0.05 and 0.15
    assert row["gain_by_baseline"]["random"] == pytest.approx(0.20, abs=1e-4)
    assert row["gain_ci95"] > 0
    # Every baseline carries its own CI and group count; the best one's are the row's.
    assert row["gain_ci95_by_baseline"]["gradient"] == row["gain_ci95"]
    assert row["gain_ci95_by_baseline"]["random"] == pytest.approx(row["gain_ci95"], abs=1e-4)  # same spread
    assert row["groups_by_baseline"] == {"gradient": 2, "random": 2}


def test_compare_flags_only_values_outside_the_published_ci():
    published = [{**_row("all", "random", 0.05, 0.5, 0.6), "generalization_ci95": 0.1, "locality_ci95": 0.02},
                 {**_row("x", "random", 0.05, 0.5, 0.6), "generalization_ci95": None, "locality_ci95": None}]
    same = compare([dict(r) for r in published], published, metrics=("generalization", "locality"))
    assert same["values_checked"] == 4 and same["values_outside_ci"] == 0 and same["max_abs_diff"] == 0
    rerun = [{**published[0], "generalization": 0.58, "locality": 0.65}, {**published[1], "generalization": 0.5001}]
    res = compare(rerun, published, metrics=("generalization", "locality"))
    assert res["values_outside_ci"] == 1
    assert res["outside"][0]["metric"] == "locality" and res["outside"][0]["group"] == "all"
    assert res["max_abs_diff"] == pytest.approx(0.08)
    # Rows missing from the published table are not counted.
    assert compare([_row("new", "l1", 1e-3, 0.1, 0.9)], published)["rows_matched"] == 0


def test_aggregate_means_and_cis_per_group_and_overall():
    rows = [{"group": g, "edit_images": 1, "method": "random", "sparsity": 0.05, "strength": None,
             "success": 1.0, "generalization": v, "locality": 0.5, "accuracy_drop": 0.0}
            for g, v in (("a", 0.2), ("a", 0.4), ("b", 0.9))]
    by = {(r["group"], r["method"]): r for r in aggregate(rows)}
    assert by[("all", "random")]["edits"] == 3 and by[("all", "random")]["generalization"] == pytest.approx(0.5)
    assert by[("a", "random")]["generalization"] == pytest.approx(0.3)
    assert by[("b", "random")]["generalization_ci95"] is None  # one edit: no interval
    assert by[("all", "random")]["locality_ci95"] == 0.0


SMALL = dict(groups=("shirt",), methods=("hypernet", "random", "l2"), edit_images=(1,), sparsities=(0.02, 0.1),
             l2_strengths=(0.1, 10.0), edits_per_group=2, max_steps=20)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "first"
    res = run_benchmark(BenchmarkConfig(out=out, **SMALL), lambda *a: None)
    return out, res


@pytest.mark.slow
def test_small_benchmark_writes_consistent_outputs(small_run):
    out, res = small_run
    assert {p.name for p in out.iterdir()} >= {"results.json", "edits.csv", "summary.csv", "tradeoff.png"}
    saved = json.loads((out / "results.json").read_text())
    # 2 edits x (hypernet 2 + random 2 + l2 2 settings) = 12 edits, all from 1 image.
    assert len(saved["edits"]) == 12
    assert saved["summary"] == res["summary"]
    for r in saved["edits"]:
        for metric in ("success", "generalization", "locality"):
            assert 0.0 <= r[metric] <= 1.0
        assert (r["sparsity"] is None) == (r["method"] == "l2")
    # Every method edits the same images: the edit index pairs them, and success is measured on them.
    assert {r["edit"] for r in saved["edits"]} == {0, 1}
    assert res["matched_locality"] and all(r["best_baseline"] in ("random", "l2") for r in res["matched_locality"])
    # Wider masks change more: random at 10% moves at least as many units as at 2%.
    units = {(r["edit"], r["sparsity"]): r["units_edited"] for r in saved["edits"] if r["method"] == "random"}
    assert all(units[(e, 0.1)] > units[(e, 0.02)] for e in (0, 1))


@pytest.mark.slow
def test_rerun_with_the_same_seed_reproduces_the_published_table(small_run, tmp_path):
    out, first = small_run
    res = run_benchmark(BenchmarkConfig(out=tmp_path / "rerun", compare_to=out / "results.json", **SMALL),
                        lambda *a: None)
    c = res["comparison"]
    assert c["config_differences"] == []
    assert c["values_checked"] > 0 and c["values_outside_ci"] == 0
    assert c["overall_rows_compared"] and c["edits_identical"] == c["edits_matched"] == 12
    assert [r["generalization"] for r in res["summary"]] == [r["generalization"] for r in first["summary"]]


@pytest.mark.slow
def test_results_name_the_measured_hypernetwork_and_a_rerun_with_another_one_says_so(small_run, tmp_path):
    from vitedit.artifacts import sha256_file
    from vitedit.models import DEFAULT_ASSETS

    out, first = small_run
    shipped = DEFAULT_ASSETS / "hypernet.safetensors"
    assert first["hypernet"] == {"path": "shipped", "sha256": sha256_file(shipped)}
    recorded = json.loads((DEFAULT_ASSETS / "hypernet.json").read_text())["model"]["weights_sha256"]
    assert first["model_weights_sha256"] == recorded
    other = json.loads((out / "results.json").read_text())
    other["hypernet"]["sha256"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(other))
    res = run_benchmark(BenchmarkConfig(**{**SMALL, "methods": ("hypernet",), "sparsities": (0.1,),
                                           "out": tmp_path / "o", "compare_to": tmp_path / "other.json"}),
                        lambda *a: None)
    assert "hypernet (sha256)" in res["comparison"]["config_differences"]


@pytest.mark.slow
def test_locality_folder_replaces_the_bundled_sensitive_set(tmp_path):
    import shutil

    from vitedit.errors import InputDataError
    from vitedit.models import DEFAULT_ASSETS

    loc = tmp_path / "loc"
    for src in sorted((DEFAULT_ASSETS / "sensitive").rglob("*.png"))[:5]:
        (loc / src.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(src, loc / src.parent.name / src.name)
    tiny = {**SMALL, "methods": ("random",), "sparsities": (0.1,), "edits_per_group": 1}
    res = run_benchmark(BenchmarkConfig(**tiny, out=tmp_path / "o", locality=loc), lambda *a: None)
    assert res["sensitive_images"] == 5 and res["config"]["locality"] == str(loc)
    # Locality on 5 images moves in steps of 1/5.
    assert all(round(r["locality"] * 5, 6).is_integer() for r in json.loads((tmp_path / "o" / "results.json")
                                                                          .read_text())["edits"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputDataError, match="no image files"):
        run_benchmark(BenchmarkConfig(**tiny, out=tmp_path / "o2", locality=tmp_path / "empty"), lambda *a: None)


@pytest.mark.slow
def test_compare_refuses_bad_or_clobbered_files(small_run, tmp_path):
    out, _ = small_run
    with pytest.raises(UsageError, match="overwrite"):
        run_benchmark(BenchmarkConfig(out=out, compare_to=out / "results.json", **SMALL), lambda *a: None)
    with pytest.raises(ArtifactError, match="not found"):
        run_benchmark(BenchmarkConfig(out=tmp_path, compare_to=tmp_path / "missing.json", **SMALL), lambda *a: None)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(UsageError, match="summary"):
        run_benchmark(BenchmarkConfig(out=tmp_path / "o", compare_to=bad, **SMALL), lambda *a: None)


@pytest.mark.slow
def test_subset_run_reproduces_the_matching_rows_of_a_larger_run(small_run, tmp_path):
    _, first = small_run
    sub = run_benchmark(BenchmarkConfig(**{**SMALL, "methods": ("random",), "sparsities": (0.1,),
                                           "out": tmp_path}), lambda *a: None)
    key = ("group", "edit_images", "method", "setting")
    full = {tuple(r[k] for k in key): r for r in first["summary"]}
    for r in sub["summary"]:
        assert r == full[tuple(r[k] for k in key)]


@pytest.mark.slow
def test_compare_skips_overall_rows_when_the_groups_differ(small_run, tmp_path):
    out, _ = small_run
    res = run_benchmark(BenchmarkConfig(**{**SMALL, "groups": ("coat",), "methods": ("random",), "sparsities": (0.1,),
                                           "out": tmp_path, "compare_to": out / "results.json"}), lambda *a: None)
    c = res["comparison"]
    assert c["config_differences"] == ["groups", "methods", "sparsities"]
    assert not c["overall_rows_compared"]
    assert c["rows_matched"] == 0 and c["values_checked"] == 0 and c["edits_matched"] == 0


@pytest.mark.slow
def test_bilevel_oracle_runs_only_when_named_and_gets_its_own_matched_locality_rows(tmp_path):
    assert "bilevel" not in BenchmarkConfig().methods  # the default run stays the published one
    res = run_benchmark(BenchmarkConfig(**{**SMALL, "groups": ("coat",), "methods": ("bilevel", "random"),
                                           "sparsities": (0.05, 0.25), "edits_per_group": 1, "out": tmp_path}),
                        lambda *a: None)
    methods = {r["method"] for r in res["summary"]}
    assert methods == {"bilevel", "random"}
    assert res["matched_locality"] and {r["method"] for r in res["matched_locality"]} == {"bilevel"}
    with pytest.raises(UsageError, match="bilevel"):
        BenchmarkConfig(methods=("oracle",))


@pytest.mark.slow
def test_group_gradient_upper_bound_runs_only_when_named(tmp_path):
    res = run_benchmark(BenchmarkConfig(**{**SMALL, "groups": ("coat",), "methods": ("group-gradient",),
                                           "sparsities": (0.05,), "edit_images": (1, 3), "out": tmp_path}),
                        lambda *a: None)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {e["method"] for e in saved["edits"]} == {"group-gradient"}
    assert all(e["success"] is not None and 0 <= e["generalization"] <= 1 for e in saved["edits"])
    assert "group-gradient" not in BenchmarkConfig().methods


def test_matched_accuracy_drop_interpolates_the_papers_curve_and_states_what_it_skips():
    from vitedit.lab.benchmark import matched_accuracy_drop

    def row(group, method, setting, drop, gen):
        return {"group": group, "edit_images": 1, "method": method, "setting": setting, "generalization": gen,
                "accuracy_drop": drop}

    summary = [row("a", "hypernet", 0.01, 1.0, 0.5), row("a", "hypernet", 0.1, 3.0, 0.9),
               row("a", "local-hypernet", 0.05, 2.0, 0.8),    # inside the curve: 0.8 - 0.7
               row("a", "local-hypernet", 0.25, 0.5, 0.45),   # below the paper's least damaging edit
               row("b", "hypernet", 0.01, 1.0, 0.5), row("b", "hypernet", 0.1, 3.0, 0.9),
               row("b", "local-hypernet", 0.05, 2.0, 0.6),    # 0.6 - 0.7
               row("b", "local-hypernet", 0.25, 4.0, 0.95),   # above it: never extrapolated
               row("all", "local-hypernet", 0.05, 2.0, 0.7)]  # overall rows are ignored
    strict = {r["setting"]: r for r in matched_accuracy_drop(summary, "local-hypernet", origin=False)}
    assert strict[0.05]["gain"] == pytest.approx(0.0) and strict[0.05]["groups"] == 2
    assert strict[0.05]["gain_ci95"] == pytest.approx(1.96 * 0.1, abs=1e-4)  # diffs +0.1 and -0.1
    assert strict[0.25]["gain"] is None and strict[0.25]["groups_outside"] == 2
    origin = {r["setting"]: r for r in matched_accuracy_drop(summary, "local-hypernet", origin=True)}
    # with the unedited model at (0, 0): at drop 0.5 the paper's curve is at 0.25
    assert origin[0.25]["gain"] == pytest.approx(0.45 - 0.25) and origin[0.25]["groups_outside"] == 1


@pytest.mark.parametrize("overlap,needle", [("sensitive", "in the locality set (--locality) is the same image as"),
                                            ("failures/shirt", "in the failures (shirt) is the same image as")])
def test_the_preserve_set_shares_no_image_with_a_measured_set(tmp_path, overlap, needle):
    """The local methods' preserve set gets apply's checks: besides the check set, no image of the
    locality set (it was compared by folder only) or of a failure group run (not compared at all)."""
    import shutil

    from vitedit.errors import InputDataError
    from vitedit.models import DEFAULT_ASSETS

    preserve = tmp_path / "preserve"
    preserve.mkdir()
    for src in sorted((DEFAULT_ASSETS / "preserve").rglob("*.png"))[:3] + sorted((DEFAULT_ASSETS / overlap).rglob("*.png"))[:1]:
        shutil.copyfile(src, preserve / f"{src.parent.name}-{src.name}")
    cfg = BenchmarkConfig(groups=("shirt",), methods=("local-random",), edit_images=(1,), edits_per_group=1,
                          out=tmp_path / "out", preserve=preserve)
    with pytest.raises(InputDataError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        run_benchmark(cfg, lambda *a: None)
    assert not (tmp_path / "out").exists()  # refused before anything was read or written


@pytest.mark.slow
def test_a_subset_rerun_reproduces_the_committed_comparison_rows():
    """benchmarks/reproduce.py: the documented command on one group and one method gives exactly the
    committed docs/benchmark-results/results.json edits (every metric) and means within their CIs."""
    import importlib.util
    import io
    from contextlib import redirect_stdout
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce.py"
    spec = importlib.util.spec_from_file_location("reproduce", path)
    reproduce = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reproduce)
    out = io.StringIO()
    with redirect_stdout(out):
        code = reproduce.main(["--groups", "bag", "--methods", "random"])
    assert code == 0, out.getvalue()
    assert "3/3 edits identical to the published ones" in out.getvalue()
