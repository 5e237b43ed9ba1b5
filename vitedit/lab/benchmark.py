"""``vitedit-lab compare``: the paper's comparison on the embedded default (method.md "Benchmark protocol").

For every bundled failure group of the default model and every edit setting (edits from 1 image, the
paper's protocol, and from 3 images): ``edits_per_group`` edits, each from the unedited model, on
images drawn with a fixed seed (per group and setting, so that a run on some groups or methods
reproduces the matching rows of a full run). Every method edits the same images:

- ``hypernet`` / ``gradient`` / ``random``: masks at each sparsity (fraction of units edited);
- ``l1`` / ``l2``: dense fine-tuning of the same matrices with an L1 / L2 penalty toward the original
  weights, strength swept;
- ``local-hypernet`` / ``local-gradient`` / ``local-random``: the same masks fitted with the local
  editor (``--objective local``: preservation term on the preserve set, null-space projection,
  margin stop), vitedit's default; ``hypernet`` with the plain fine-tune is the paper's method;
- diagnostics, only when named: ``bilevel`` (meta-training's mask search on the edit images with
  their labels) and ``group-gradient`` (gradient masks from the whole group: an upper bound).

Per edit: **success** (edit images now correct), **generalization** (the group's *other* failures
now correct), **locality** (share of the bundled sensitive set whose top-1 is unchanged),
**accuracy drop** (base minus edited accuracy on the check set, in percentage points; default the
bundled 1,000-image in-distribution test sample, ``--check`` for another labeled folder such as the
zoo's 7,953-image ``test-images`` pool) and **flip rate** (share of check images whose top-1 changed).
Aggregates: mean and 95% confidence interval (normal approximation, 1.96 standard errors) per group
and overall. Matched comparisons: generalization at the same locality (``matched_locality``) and at
the same accuracy drop against the paper's method (``matched_accuracy_drop``).

Everything frozen is computed once: prefix tokens of all groups, the sensitive set and the test
sample at the first edited block, and the base predictions.
"""

from __future__ import annotations

import csv
import math
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from ..artifacts import atomic_path, portable_path, sha256_file, write_json
from ..errors import UsageError

if TYPE_CHECKING:
    import torch

SPARSITIES = (0.01, 0.02, 0.05, 0.1, 0.25, 0.5)
L1_STRENGTHS = (1e-4, 1e-3, 1e-2, 1e-1)
L2_STRENGTHS = (1e-2, 1e-1, 1.0, 10.0)
LOCAL_METHODS = ("local-hypernet", "local-gradient", "local-random")  # the local editor with those masks
METHODS = ("hypernet", "random", "gradient", "l1", "l2") + LOCAL_METHODS  # the default run
# Diagnostics, run only when named in --methods: ``bilevel`` is meta-training's mask search on the edit
# images with their labels (what the hypernetwork imitates); ``group-gradient`` is gradient masks from
# *every* failure of the group, held-out ones included (an upper bound on what knowing the
# subpopulation can give a mask: it sees the images it is scored on, so it is not a method).
ORACLES = ("bilevel", "group-gradient")
MASK_METHODS = ("hypernet", "random", "gradient") + ORACLES + LOCAL_METHODS
METRICS = ("success", "generalization", "locality", "accuracy_drop", "flip_rate")  # per edit; mean with a 95% CI
PAPER_METHOD = "hypernet"  # hypernetwork masks + the plain fine-tune


@dataclass(frozen=True)
class BenchmarkConfig:
    groups: tuple[str, ...] | None = None
    methods: tuple[str, ...] = METHODS
    edit_images: tuple[int, ...] = (1, 3)
    sparsities: tuple[float, ...] = SPARSITIES
    l1_strengths: tuple[float, ...] = L1_STRENGTHS
    l2_strengths: tuple[float, ...] = L2_STRENGTHS
    edits_per_group: int = 5
    out: Path = Path("benchmark-results")
    seed: int = 0
    lr: float | None = None
    max_steps: int = 100
    hypernet: Path | None = None
    compare_to: Path | None = None    # a published results.json to check this run against
    locality: Path | None = None      # a locality folder (`vitedit sensitive`); default: the bundled set
    check: Path | None = None         # a labeled check folder; default: the bundled 1,000-image test sample
    preserve: Path | None = None      # the local editor's preserve set; default: the bundled one
    local_sparsities: tuple[float, ...] | None = None  # the local methods' sweep; default: ``sparsities``

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS + ORACLES]
        if bad:
            raise UsageError(f"--methods: unknown {', '.join(bad)}; choose from {', '.join(METHODS + ORACLES)}")
        if any(k < 1 for k in self.edit_images):
            raise UsageError("--edit-images: each value must be at least 1")
        if self.edits_per_group < 1:
            raise UsageError("--edits-per-group must be at least 1")


def _seed(*parts) -> int:
    """A seed for one (group, edit setting, ...) that does not depend on which other groups or methods
    run, so a run on a subset reproduces the matching rows of the full run exactly."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def config_record(cfg) -> dict:
    """A run's frozen config as results record it: tuples as lists, paths portable."""
    return {k: (list(v) if isinstance(v, tuple) else portable_path(v) if isinstance(v, Path) else v)
            for k, v in asdict(cfg).items()}


def mean_ci(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and the half-width of a 95% normal-approximation confidence interval."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, None
    var = sum((v - m) ** 2 for v in vals) / (len(vals) - 1)
    return m, 1.96 * math.sqrt(var / len(vals))


def run_benchmark(cfg: BenchmarkConfig, progress: Callable[[str, int, int], None]) -> dict:
    """The benchmark of the module docstring; writes results.json, edits.csv, summary.csv and
    tradeoff.png under ``cfg.out`` and returns the results (without the per-edit rows)."""
    from ..demo import examples
    from ..imagesets import benchmark_sets, failure_group
    from ..models import load_model
    from ..pipeline import resolve_edit_config

    t_start = time.time()
    published = _read_published(cfg)  # read first: fail fast, and before --out could replace it
    loaded = load_model(None)
    sites = tuple(loaded.sites())
    all_groups = {g["group"]: g for g in examples()}
    groups = list(cfg.groups) if cfg.groups else sorted(all_groups)
    unknown = [g for g in groups if g not in all_groups]
    if unknown:
        raise UsageError(f"--groups: unknown {', '.join(unknown)}; see `vitedit examples`")
    methods = list(cfg.methods)
    hypernet, hypernet_id = _hypernet_for(cfg, loaded, sites, methods)
    sets = benchmark_sets(loaded, {g: failure_group(loaded, g, Path(all_groups[g]["path"])) for g in groups},
                          check=cfg.check, locality=cfg.locality, preserve=cfg.preserve,
                          with_preserve=any(m in LOCAL_METHODS for m in methods))
    frozen = _cache_frozen(loaded, sites, sets, hypernet, methods, progress)
    bench = _Bench(cfg, loaded, sites, methods, hypernet, frozen,
                   resolve_edit_config(loaded, {"lr": cfg.lr, "max_steps": cfg.max_steps}),
                   resolve_edit_config(loaded, {"lr": cfg.lr}, "local"))
    rows_out = _run_edits(bench, _plan(cfg, frozen.groups), _variants(cfg, methods), progress)

    summary = aggregate(rows_out)
    result = _result(bench, groups, hypernet_id, summary, t_start)
    if published is not None:
        result["comparison"] = _comparison(cfg, result, published, hypernet_id, groups, summary, rows_out)
    out = Path(cfg.out)
    _write_outputs(out, result, rows_out, summary, cfg.edit_images)
    result["out"] = str(out)
    return result


def _read_published(cfg: BenchmarkConfig) -> dict | None:
    """The results.json ``--compare`` names (None without one), checked to be a benchmark's."""
    if cfg.compare_to is None:
        return None
    from ..artifacts import read_json

    if Path(cfg.compare_to).resolve() == (Path(cfg.out) / "results.json").resolve():
        raise UsageError("--compare names the results.json this run would overwrite; pass another --out")
    published = read_json(cfg.compare_to, "published benchmark results")
    if not isinstance(published.get("summary"), list):
        raise UsageError(f"--compare: {cfg.compare_to} has no 'summary' list; pass a results.json written by "
                         "`vitedit-lab compare`")
    return published


def _hypernet_for(cfg: BenchmarkConfig, loaded, sites, methods: list[str]) -> tuple[object, dict | None]:
    """The hypernetwork the hypernet methods use and what identifies it (None, None when none runs)."""
    from ..hypernet import load_hypernet
    from ..pipeline import default_hypernet_for

    if "hypernet" not in methods and "local-hypernet" not in methods:
        return None, None
    path = cfg.hypernet or default_hypernet_for(loaded)
    if path is None:
        raise UsageError("the hypernet method needs a hypernetwork: pass --hypernet PATH or leave it out of --methods")
    hypernet, _ = load_hypernet(Path(path), loaded.identity, sites)
    # Which one was measured, by content; the shipped one by name, not by this machine's install path.
    return hypernet, {"path": portable_path(cfg.hypernet) if cfg.hypernet else "shipped", "sha256": sha256_file(path)}


@dataclass
class _Frozen:
    """What no edit changes, cached at the first edited block: the locality (sensitive) set and the
    check set with the base model's predictions, the preserve set, and per group its images, labels,
    token cache and hypernetwork input (and, when asked, its group-gradient scores)."""

    sens: object                     # evaluate.TokenCache
    sens_base: "torch.Tensor"
    test: object                     # evaluate.TokenCache
    test_y: "torch.Tensor"
    test_base: "torch.Tensor"
    base_test_acc: float
    preserve: object                 # preserve.PreserveSet | None
    groups: dict                     # group -> (images, labels, TokenCache, features or None)
    group_scores: dict


def _cache_frozen(loaded, sites, sets, hypernet, methods: list[str], progress) -> _Frozen:
    import torch

    from ..evaluate import TokenCache
    from ..imagesets import read_set
    from ..locate import LocateInputs, gradient_locator
    from ..locate import aggregate as mean_scores
    from ..preserve import build_preserve_set

    model, start = loaded.model, min(s.block for s in sites)
    progress("caching", 0, 3)
    sens = TokenCache(model, start, read_set(sets.locality, loaded, progress, "loading locality set")[0])
    sens_base = sens.predict()
    test_x, test_refs = read_set(sets.check, loaded, progress, "loading check set")
    test_y = torch.tensor([r.label for r in test_refs])
    test = TokenCache(model, start, test_x)
    del test_x
    test_base = test.predict()
    preserve = None
    if sets.preserve is not None:
        preserve = build_preserve_set(model, sites, read_set(sets.preserve, loaded, progress, "loading preserve set")[0])
    group_data = {}
    for g, group in sets.groups.items():
        x, refs = read_set(group, loaded, progress, f"loading {g}")
        cache = TokenCache(model, start, x)
        feats = None
        if hypernet is not None:
            with torch.no_grad():  # the hypernetwork's input, from the cached prefix: (N, T, D) -> (N, D)
                feats = cache.suffix(cache.tokens, pre_logits=True)
        group_data[g] = (x, torch.tensor([r.label for r in refs]), cache, feats)
    group_scores = {}
    if "group-gradient" in methods:
        for g, (x, y, _, _) in group_data.items():
            group_scores[g] = mean_scores(gradient_locator(LocateInputs(model, sites, x, y)), sites, None,
                                          "group-gradient")
    progress("caching", 3, 3)
    return _Frozen(sens, sens_base, test, test_y, test_base, float((test_base == test_y).float().mean()), preserve,
                   group_data, group_scores)


@dataclass
class _Bench:
    """One run's fixed parts: its config, model, sites and methods, the hypernetwork, the frozen caches
    and the two editors' configs (the paper's fine-tune and the local editor)."""

    cfg: BenchmarkConfig
    loaded: object                   # models.LoadedModel
    sites: tuple
    methods: list[str]
    hypernet: object
    frozen: _Frozen
    edit_cfg: object                 # edit.EditConfig
    local_cfg: object


def _plan(cfg: BenchmarkConfig, group_data: dict) -> list[tuple[str, int, int, list[int]]]:
    """(group, edit images, edit index, rows): each group's edit images, drawn per (group, setting)."""
    import torch

    plan = []
    for g, (_, y, _, _) in group_data.items():
        n = len(y)
        for k in cfg.edit_images:
            if n <= k:
                continue
            gen = torch.Generator().manual_seed(_seed(cfg.seed, g, k))
            for e in range(cfg.edits_per_group):
                rows = torch.randperm(n, generator=gen)[:k].sort().values.tolist()
                plan.append((g, k, e, rows))
    return plan


def _variants(cfg: BenchmarkConfig, methods: list[str]) -> list[tuple[str, str, float]]:
    """(method, knob, value) for every setting of every method's sweep."""
    variants = []
    for m in methods:
        if m in LOCAL_METHODS:
            variants += [(m, "sparsity", s) for s in (cfg.local_sparsities or cfg.sparsities)]
        elif m in MASK_METHODS:
            variants += [(m, "sparsity", s) for s in cfg.sparsities]
        else:
            variants += [(m, "strength", s) for s in (cfg.l1_strengths if m == "l1" else cfg.l2_strengths)]
    return variants


def _run_edits(bench: _Bench, plan: list, variants: list, progress) -> list[dict]:
    """Every (planned edit, variant): one edit from the unedited model, measured."""
    import torch

    from ..masks import UnitScores

    full = UnitScores(bench.sites, {s.param: torch.ones(s.units) for s in bench.sites}, "all").select(1.0)  # l1/l2
    rows_out = []
    total = len(plan) * len(variants)
    for g, k, e, rows in plan:
        per_image = _mask_scores(bench, g, k, e, rows)
        for method, knob, value in variants:
            if knob == "sparsity":
                mask, penalty = per_image[method.removeprefix("local-")].select(value), None
            else:
                mask, penalty = full, (method, value)
            rows_out.append(_edit_row(bench, g, k, e, rows, method, knob, value, mask, penalty))
            progress("benchmark edits", len(rows_out), total)
    return rows_out


def _mask_scores(bench: _Bench, g: str, k: int, e: int, rows: list[int]) -> dict:
    """Each mask method's unit scores for one edit's images (local methods share their mask's)."""
    import torch

    from ..locate import LocateInputs, bilevel_locator, gradient_locator, random_locator
    from ..locate import aggregate as mean_scores
    from ..masks import UnitScores

    model, sites, methods, seed = bench.loaded.model, bench.sites, bench.methods, bench.cfg.seed
    x, y, _, feats = bench.frozen.groups[g]
    edit_labels = y[rows]
    per_image = {}
    uses = {m.removeprefix("local-") for m in methods}
    if "hypernet" in uses:
        with torch.no_grad():
            scores = bench.hypernet(feats[rows])
        per_image["hypernet"] = UnitScores(sites, {s.param: sc.mean(0) for s, sc in zip(sites, scores)}, "hypernet")
    if "gradient" in uses:
        gs = gradient_locator(LocateInputs(model, sites, x[rows], edit_labels))
        per_image["gradient"] = mean_scores(gs, sites, None, "gradient")
    if "bilevel" in methods:
        bs = bilevel_locator(LocateInputs(model, sites, x[rows], edit_labels, seed=_seed(seed, g, k, e, "bilevel")))
        per_image["bilevel"] = mean_scores(bs, sites, None, "bilevel")
    if "group-gradient" in methods:
        per_image["group-gradient"] = bench.frozen.group_scores[g]
    if "random" in uses:
        rs = random_locator(LocateInputs(model, sites, None, None, seed=_seed(seed, g, k, e, "random")))
        per_image["random"] = UnitScores(sites, {p: v[0] for p, v in rs.items()}, "random")
    return per_image


def _edit_row(bench: _Bench, g: str, k: int, e: int, rows: list[int], method: str, knob: str, value: float, mask,
              penalty) -> dict:
    """One edit of ``rows`` of group ``g`` with ``mask`` (and ``penalty``), and its figures."""
    from ..edit import edit

    model, frozen = bench.loaded.model, bench.frozen
    x, y, cache, _ = frozen.groups[g]
    others = [i for i in range(len(y)) if i not in set(rows)]
    local = method in LOCAL_METHODS
    res = edit(model, mask, x[rows], y[rows], bench.local_cfg if local else bench.edit_cfg, tokens=cache.tokens[rows],
               penalty=penalty, preserve=frozen.preserve if local else None,
               seed=_seed(bench.cfg.seed, g, k, e, "preserve"))
    w = res.patch.weights(model)
    gen_acc = float((cache.predict(w)[others] == y[others]).float().mean()) if others else None
    test_pred = frozen.test.predict(w)
    return {
        "group": g, "edit_images": k, "edit": e, "method": method, knob: value,
        "sparsity": value if knob == "sparsity" else None, "strength": value if knob == "strength" else None,
        "units_edited": mask.selected, "steps": res.steps, "converged": res.converged,
        "success": res.edit_accuracy, "generalization": gen_acc,
        "locality": float((frozen.sens.predict(w) == frozen.sens_base).float().mean()),
        "accuracy_drop": round(100.0 * (frozen.base_test_acc - float((test_pred == frozen.test_y).float().mean())), 4),
        "flip_rate": float((test_pred != frozen.test_base).float().mean()),
    }


def _result(bench: _Bench, groups: list[str], hypernet_id: dict | None, summary: list[dict], t_start: float) -> dict:
    """The run's results: provenance, the summary and the matched comparisons."""
    cfg, methods, loaded, frozen = bench.cfg, bench.methods, bench.loaded, bench.frozen
    gains = [row for m in ("hypernet",) + ORACLES if m in methods for row in matched_locality(summary, m)]
    drop_gains = ([row for m in LOCAL_METHODS if m in methods for origin in (True, False)
                   for row in matched_accuracy_drop(summary, m, origin=origin)] if PAPER_METHOD in methods else [])
    return {
        "model": loaded.name, "model_weights_sha256": loaded.identity.get("weights_sha256"),
        "hypernet": hypernet_id, "groups": groups, "methods": methods, "edit_images": list(cfg.edit_images),
        "edits_per_group": cfg.edits_per_group, "edit_lr": bench.edit_cfg.lr, "max_steps": cfg.max_steps,
        "seed": cfg.seed, "sensitive_images": len(frozen.sens), "test_images": len(frozen.test_y),
        "base_test_accuracy": frozen.base_test_acc,
        "check": "bundled test sample" if cfg.check is None else portable_path(cfg.check),
        "preserve_images": len(frozen.preserve) if frozen.preserve is not None else 0,
        "local_edit_config": bench.local_cfg.to_json() if frozen.preserve is not None else None,
        "config": config_record(cfg),
        "wall_seconds": round(time.time() - t_start, 1),
        "summary": summary,
        "matched_locality": gains,
        "matched_accuracy_drop": drop_gains,
    }


def _comparison(cfg: BenchmarkConfig, result: dict, published: dict, hypernet_id: dict | None, groups: list[str],
                summary: list[dict], rows_out: list[dict]) -> dict:
    """This run against the published one: config differences, then ``compare`` and ``identical_edits``."""
    ignore = {"out", "compare_to", "hypernet"}  # the hypernetwork is compared by content, below
    differs = sorted(k for k, v in result["config"].items()
                     if k not in ignore and published.get("config", {}).get(k) != v)
    theirs = (published.get("hypernet") or {}).get("sha256")
    if hypernet_id and theirs and theirs != hypernet_id["sha256"]:
        differs.append("hypernet (sha256)")
    # Overall rows average over the groups run: comparable only when the group sets match.
    same_groups = sorted(published.get("groups") or []) == sorted(groups)
    rows = summary if same_groups else [r for r in summary if r["group"] != "all"]
    return {"published": portable_path(cfg.compare_to), "config_differences": differs,
            "overall_rows_compared": same_groups, **compare(rows, published["summary"]),
            **identical_edits(rows_out, published.get("edits") or [])}


def _write_outputs(out: Path, result: dict, rows_out: list[dict], summary: list[dict],
                   edit_images: Sequence[int]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", {**result, "edits": rows_out})
    _write_csv(out / "edits.csv", rows_out, "group")
    _write_csv(out / "summary.csv", summary, "method")
    plot_benchmark(summary, out, edit_images)


def _write_csv(path: Path, rows: list[dict], empty_header: str) -> None:
    """``rows`` as a CSV with their keys as header (``empty_header`` alone when there are none), atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()) if rows else [empty_header])
        writer.writeheader()
        writer.writerows(rows)


def aggregate(rows: Sequence[dict]) -> list[dict]:
    """Overall (group "all") and per-group mean and 95% CI for every (edit_images, method, setting)."""
    keys = {}
    for r in rows:
        setting = r["sparsity"] if r["sparsity"] is not None else r["strength"]
        for grp in ("all", r["group"]):
            keys.setdefault((grp, r["edit_images"], r["method"], setting), []).append(r)
    out = []
    for (grp, k, method, setting), rs in sorted(keys.items(), key=lambda kv: (kv[0][0] != "all", kv[0][0], kv[0][1],
                                                                               kv[0][2], kv[0][3])):
        entry = {"group": grp, "edit_images": k, "method": method,
                 "setting": setting, "knob": "sparsity" if rs[0]["sparsity"] is not None else "strength", "edits": len(rs)}
        for metric in METRICS:
            m, ci = mean_ci([r.get(metric) for r in rs])
            entry[metric] = None if m is None else round(m, 4)
            entry[f"{metric}_ci95"] = None if ci is None else round(ci, 4)
        out.append(entry)
    return out


BASELINES = ("random", "gradient", "l1", "l2")


def format_ci(row: dict, key: str, pm: str = "+/-") -> str:
    """``row[key]`` with its 95% CI (``row[key + "_ci95"]``) for tables: "0.452 +/- 0.092"."""
    m, ci = row[key], row[f"{key}_ci95"]
    if m is None:
        return "n/a"
    return f"{m:.3f}" if ci is None else f"{m:.3f} {pm} {ci:.3f}"


def _interp(curve: Sequence[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of y at x on a curve of (x, y) points; None outside its x range."""
    pts = sorted(curve)
    if not pts or x < pts[0][0] or x > pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[0][1]


def matched_locality(summary: Sequence[dict], method: str = "hypernet",
                     baselines: Sequence[str] = BASELINES) -> list[dict]:
    """``method``'s generalization minus each baseline's at the same locality, averaged over groups.

    Per group and edit setting, a baseline's generalization-vs-locality curve (its group means over
    its sweep) is interpolated linearly at the locality of each ``method`` point; points outside the
    baseline's locality range are skipped (no extrapolation). The gain against a baseline is the mean
    of these differences over groups, with a 95% CI across groups. The best baseline is the one with
    the smallest mean gain (choosing it per group instead would favour the baselines: the maximum of
    several noisy curves is biased upward). Returns one row per (edit_images, setting), with every
    baseline's gain, CI and group count as well as the best one's.
    """
    by = {}
    for r in summary:
        if r["group"] != "all" and r["generalization"] is not None and r["locality"] is not None:
            by.setdefault((r["group"], r["edit_images"]), []).append(r)
    diffs: dict[tuple[int, float], dict[str, list[float]]] = {}
    for (group, k), rows in sorted(by.items()):
        for b in baselines:
            curve = [(r["locality"], r["generalization"]) for r in rows if r["method"] == b]
            for r in rows:
                at = _interp(curve, r["locality"]) if r["method"] == method else None
                if at is not None:
                    diffs.setdefault((k, r["setting"]), {}).setdefault(b, []).append(r["generalization"] - at)
    out = []
    for (k, setting), per in sorted(diffs.items()):
        stats = {b: mean_ci(v) + (len(v),) for b, v in per.items()}
        best = min(stats, key=lambda b: stats[b][0])
        m, ci, n = stats[best]
        out.append({"edit_images": k, "method": method, "setting": setting, "best_baseline": best, "groups": n,
                    "gain": round(m, 4), "gain_ci95": None if ci is None else round(ci, 4),
                    "gain_by_baseline": {b: round(v[0], 4) for b, v in sorted(stats.items())},
                    "gain_ci95_by_baseline": {b: None if v[1] is None else round(v[1], 4)
                                              for b, v in sorted(stats.items())},
                    "groups_by_baseline": {b: v[2] for b, v in sorted(stats.items())}})
    return out


def matched_accuracy_drop(summary: Sequence[dict], method: str, baseline: str = PAPER_METHOD,
                          origin: bool = True) -> list[dict]:
    """``method``'s generalization minus ``baseline``'s at the same check-set accuracy drop, over groups.

    Per group and edit setting, the baseline's generalization-vs-accuracy-drop curve (group means over
    its sparsity sweep) is interpolated linearly at each ``method`` point's drop; points outside the
    curve's range are skipped (no extrapolation) and counted. With ``origin`` the unedited model is
    part of the baseline's curve, as the point (drop 0, generalization 0): the held-out images are
    failures of the base model, so a zero-strength edit fixes none of them. That is what lets a point
    that loses less accuracy than the baseline's least damaging edit be compared at all; without it
    (``origin=False``) only drops inside the baseline's own sweep count. Mean over groups with a 95% CI,
    one row per (edit_images, setting).
    """
    by = {}
    for r in summary:
        if r["group"] != "all" and r["generalization"] is not None and r.get("accuracy_drop") is not None:
            by.setdefault((r["group"], r["edit_images"]), []).append(r)
    diffs: dict[tuple[int, float], list[float]] = {}
    skipped: dict[tuple[int, float], int] = {}
    for (group, k), rows in sorted(by.items()):
        curve = [(r["accuracy_drop"], r["generalization"]) for r in rows if r["method"] == baseline]
        if not curve:
            continue
        if origin:
            curve.append((0.0, 0.0))
        for r in rows:
            if r["method"] != method:
                continue
            at = _interp(curve, r["accuracy_drop"])
            if at is None:
                skipped[(k, r["setting"])] = skipped.get((k, r["setting"]), 0) + 1
                diffs.setdefault((k, r["setting"]), [])
            else:
                diffs.setdefault((k, r["setting"]), []).append(r["generalization"] - at)
    out = []
    for (k, setting), v in sorted(diffs.items()):
        m, ci = mean_ci(v)
        out.append({"edit_images": k, "method": method, "baseline": baseline, "setting": setting, "groups": len(v),
                    "groups_outside": skipped.get((k, setting), 0), "origin": origin,
                    "gain": None if m is None else round(m, 4), "gain_ci95": None if ci is None else round(ci, 4)})
    return out


def compare(summary: Sequence[dict], published: Sequence[dict],
            metrics: Sequence[str] = METRICS) -> dict:
    """Check a rerun against a published summary: is every mean inside the published 95% CI?

    Rows are matched on (group, edit_images, method, setting). A published mean with no CI (one
    edit, or none) must be reproduced exactly (to 1e-4). Returns the counts and the rows outside.
    """
    ref = {(r["group"], r["edit_images"], r["method"], r["setting"]): r for r in published}
    matched_rows, checked, outside, max_diff = 0, 0, [], 0.0
    for r in summary:
        p = ref.get((r["group"], r["edit_images"], r["method"], r["setting"]))
        if p is None:
            continue
        matched_rows += 1
        for metric in metrics:
            new, old = r.get(metric), p.get(metric)
            if new is None or old is None:
                continue
            checked += 1
            diff = abs(new - old)
            max_diff = max(max_diff, diff)
            if diff > (p.get(f"{metric}_ci95") or 0.0) + 1e-4:
                outside.append({"group": r["group"], "edit_images": r["edit_images"], "method": r["method"],
                                "setting": r["setting"], "metric": metric, "published": old, "rerun": new,
                                "published_ci95": p.get(f"{metric}_ci95")})
    return {"rows_matched": matched_rows, "values_checked": checked, "values_outside_ci": len(outside),
            "max_abs_diff": round(max_diff, 4), "outside": outside}


def _edit_key(e: dict) -> tuple:
    return e["group"], e["edit_images"], e["edit"], e["method"], e["sparsity"], e["strength"]


def identical_edits(edits: Sequence[dict], published: Sequence[dict]) -> dict:
    """How many of this run's edits have a published counterpart, and how many match it field for field."""
    ref = {_edit_key(e): e for e in published}
    matched = [e for e in edits if _edit_key(e) in ref]
    return {"edits_matched": len(matched), "edits_identical": sum(1 for e in matched if e == ref[_edit_key(e)])}


def plot_benchmark(summary: Sequence[dict], out: Path, edit_images: Sequence[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(edit_images), figsize=(5.5 * len(edit_images), 4.5), dpi=120, squeeze=False)
    for ax, k in zip(axes[0], edit_images):
        rows = [r for r in summary if r["group"] == "all" and r["edit_images"] == k]
        for method in sorted({r["method"] for r in rows}):
            pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["setting"])
            xs = [r["locality"] for r in pts]
            ys = [r["generalization"] for r in pts]
            ax.errorbar(xs, ys, xerr=[r["locality_ci95"] or 0 for r in pts], yerr=[r["generalization_ci95"] or 0 for r in pts],
                        marker="o", capsize=2, label=method)
        ax.set_xlabel("locality (sensitive set unchanged)")
        ax.set_ylabel("generalization (other failures fixed)")
        ax.set_title(f"edits from {k} image{'s' if k > 1 else ''} (mean, 95% CI)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out / "tradeoff.png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
