"""``vitedit-lab stack``: many edits in one model, and what they do to each other.

Protocol (docs/research-log.md, "Many edits in one model"), on the embedded default:

- every bundled failure group with more than ``edit_images`` failures takes part; per group a seeded
  draw of ``edit_images`` failures is its edit set and the rest its held-out set, the same in every
  arm and order, so a group's failures never count for another group;
- **single**: each group edited alone from the base model (the paper's protocol), per editor: the
  reference for what an edit achieves;
- **sequential**: for each of ``orders`` seeded orders of the groups, each group is edited on top of
  the previous edits (masks from the hypernetwork on the current model, as ``locate --on-top`` does).
  After every edit, every group edited so far is re-measured (success on its edit images,
  generalization on its held-out failures), and the check set (accuracy and flip rate against the
  base model) and the locality set are measured;
- **batch**: one edit of all groups' edit images at once, per editor.
Editors: ``plain`` (the paper's fine-tune) and ``local`` (vitedit's default); both with hypernetwork
masks at ``sparsity``. The preserve, check and locality sets are fixed for the whole run. In a stack
the local editor holds the preserve set to the *base* model's predictions (ordinary images were never
meant to change: holding them to the current model lets the drift of every edit compound) and the
earlier edits' edit images to the *current* model's (the anchor set: what the earlier edits fixed),
as ``apply --on-top`` does.

*Retained* generalization of a group after a stack: its generalization then, divided by what its
single edit reached; *still fixed*: the share of the held-out failures its single edit fixed that are
still fixed.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..artifacts import atomic_path, portable_path, write_json
from .benchmark import _seed, config_record, mean_ci  # one seed rule and one config record for both benchmarks
from ..errors import UsageError

if TYPE_CHECKING:
    import torch

    from ..masks import UnitScores

EDITORS = ("plain", "local")


@dataclass(frozen=True)
class SequentialConfig:
    editors: tuple[str, ...] = EDITORS
    edit_images: int = 10
    orders: int = 2
    sparsity: float = 0.05
    seed: int = 0
    out: Path = Path("benchmark-sequential")
    check: Path | None = None
    preserve: Path | None = None
    locality: Path | None = None
    batch: bool = True
    groups: tuple[str, ...] | None = None   # default: every bundled group with enough failures
    anchor_weight: float | None = None      # local editor: hold earlier edits' images (None: the preset's)
    anchor_views: int | None = None         # local editor: views of each anchor image also held (None: the preset's)
    preserve_targets: str = "base"          # the preserve set's targets in a stack: base or current model
    disjoint: bool = False                  # a later edit never changes units an earlier edit changed

    def __post_init__(self) -> None:
        bad = [e for e in self.editors if e not in EDITORS]
        if bad:
            raise UsageError(f"--editors: unknown {', '.join(bad)}; choose from {', '.join(EDITORS)}")
        if self.preserve_targets not in ("base", "current"):
            raise UsageError(f"preserve targets {self.preserve_targets!r}: choose base or current")
        if self.orders < 1 or self.edit_images < 1:
            raise UsageError("--orders and --edit-images must be at least 1")


def run_sequential(cfg: SequentialConfig, progress: Callable[[str, int, int], None]) -> dict:
    """The protocol of the module docstring; writes sequential.json and sequential.png under
    ``cfg.out`` (and sequential.partial.json while it runs) and returns the results."""
    t0 = time.time()
    run = _start(cfg, progress, t0)
    rows: list[dict] = []
    for editor in cfg.editors:
        _single_edits(run, editor)
        for o in range(cfg.orders):
            _stack_in_order(run, editor, o, rows)
        if cfg.batch:  # all groups' edit images in one edit
            rows.append(_batch_edit(run, editor))
            run.partial(rows)
            run.advance()

    summary = summarize(rows, run.singles, len(run.groups))
    result = {"model": run.base.name, "groups": [g["group"] for g in run.groups], "edit_images": cfg.edit_images,
              "held_out": {g["group"]: len(g["y_hold"]) for g in run.groups},
              "orders": cfg.orders, "sparsity": cfg.sparsity, "base_check_accuracy": run.base_check,
              "check_images": len(run.check_y),
              "check": "bundled test sample" if cfg.check is None else portable_path(cfg.check),
              "config": config_record(cfg),
              "edit_configs": {k: v.to_json() for k, v in run.configs.items()},
              "singles": run.singles_json(),
              "rows": rows, "summary": summary, "wall_seconds": round(time.time() - t0, 1)}
    write_json(run.out / "sequential.json", result)
    (run.out / "sequential.partial.json").unlink(missing_ok=True)
    plot_sequential(rows, run.out / "sequential.png", run.base_check)
    result["out"] = str(run.out)
    return result


@dataclass
class _SeqRun:
    """One sequential run: the base model, its hypernetwork and the editors' configs; the groups
    (edit images, held-out failures); the check, locality and preserve sets, cached once; the single
    edits' figures every stack is compared with (``singles``); and the progress count."""

    cfg: SequentialConfig
    base: object                     # models.LoadedModel
    sites: tuple
    hypernet: object
    configs: dict                    # editor -> edit.EditConfig
    groups: list[dict]
    check: object                    # evaluate.TokenCache
    check_y: "torch.Tensor"
    check_base: "torch.Tensor"       # the base model's top-1 on the check set
    base_check: float                # the base model's check accuracy
    loc: object                      # evaluate.TokenCache
    loc_base: "torch.Tensor"
    preserve_x: "torch.Tensor | None"
    preserve: object                 # preserve.PreserveSet | None
    out: Path
    t0: float
    progress: Callable[[str, int, int], None]
    singles: dict = field(default_factory=dict)
    done: int = 0

    @property
    def start(self) -> int:
        return min(s.block for s in self.sites)

    @property
    def total(self) -> int:
        cfg = self.cfg
        return len(cfg.editors) * (len(self.groups) * (1 + cfg.orders) + (1 if cfg.batch else 0))

    def advance(self) -> None:
        self.done += 1
        self.progress("sequential benchmark", self.done, self.total)

    def measure(self, weights: dict) -> dict:
        """Every set under ``weights`` (all edited matrices of the current model) substituted into the
        base model's suffix: the blocks before the first edited one never change, so the cached prefix
        tokens stay exact."""
        pred = self.check.predict(weights)
        out = {"check_accuracy": float((pred == self.check_y).float().mean()),
               "flip_rate": float((pred != self.check_base).float().mean()),
               "locality": float((self.loc.predict(weights) == self.loc_base).float().mean())}
        for g in self.groups:
            p = g["hold"].predict(weights)
            out[g["group"]] = {"generalization": float((p == g["y_hold"]).float().mean()), "fixed": (p == g["y_hold"])}
        return out

    def scores_on(self, model, x_edit_tokens) -> "UnitScores":
        """The hypernetwork's unit scores for these edit images on ``model`` (the current stack)."""
        import torch

        from ..masks import UnitScores
        from ..models import make_suffix

        with torch.no_grad():
            feats = make_suffix(model, self.start)(x_edit_tokens, pre_logits=True)
            sc = self.hypernet(feats)
        return UnitScores(self.sites, {s.param: v.mean(0) for s, v in zip(self.sites, sc)}, "hypernet")

    def edit_on(self, model, xe, ye, tokens, editor: str, seed: int, kept=None, anchors=None, exclude=None):
        """Edit ``model`` in place (the next edit starts there) with hypernetwork masks; the result."""
        from ..edit import edit

        config = self.configs[editor]
        mask = self.scores_on(model, tokens).select(self.cfg.sparsity, exclude)
        res = edit(model, mask, xe, ye, config, tokens=tokens,
                   preserve=(kept if kept is not None else self.preserve) if config.uses_preserve else None,
                   seed=seed, anchors=anchors)
        res.patch.apply(model)
        return res

    def group_figures(self, h: dict, m: dict, editor: str, **first) -> dict:
        """Group ``h`` after a stack measured as ``m``, against its single edit (retained, still fixed)."""
        single = self.singles[editor][h["group"]]
        gen = m[h["group"]]["generalization"]
        still = (m[h["group"]]["fixed"] & single["fixed"]).sum() / max(int(single["fixed"].sum()), 1)
        return {"group": h["group"], **first, "generalization": gen,
                "single_generalization": single["generalization"],
                "retained": gen / single["generalization"] if single["generalization"] else None,
                "still_fixed": float(still)}

    def stack_row(self, m: dict, per_group: list[dict], **head) -> dict:
        """One row of the results: the stack's check and locality figures and the means over its groups."""
        return {**head, "check_accuracy": m["check_accuracy"],
                "accuracy_drop": round(100 * (self.base_check - m["check_accuracy"]), 4),
                "flip_rate": m["flip_rate"], "locality": m["locality"], "groups": per_group,
                "mean_retained": mean_ci([p["retained"] for p in per_group])[0],
                "mean_still_fixed": mean_ci([p["still_fixed"] for p in per_group])[0],
                "mean_generalization": mean_ci([p["generalization"] for p in per_group])[0]}

    def singles_json(self) -> dict:
        return {e: {g: {k: v for k, v in d.items() if k != "fixed"} for g, d in s.items()}
                for e, s in self.singles.items()}

    def partial(self, rows: list[dict]) -> None:
        """The rows so far, so that an interrupted run still leaves its figures (rewritten atomically)."""
        write_json(self.out / "sequential.partial.json", {
            "model": self.base.name, "rows": rows, "wall_seconds": round(time.time() - self.t0, 1),
            "singles": self.singles_json()})


def _start(cfg: SequentialConfig, progress: Callable[[str, int, int], None], t0: float) -> _SeqRun:
    """Load the default model and its hypernetwork, the groups taking part, and the check, locality
    and (when an editor reads it) preserve sets, checked apart (``imagesets.benchmark_sets``)."""
    import torch

    from ..evaluate import TokenCache
    from ..hypernet import load_hypernet
    from ..imagesets import benchmark_sets, read_set
    from ..models import load_model
    from ..pipeline import default_hypernet_for, resolve_edit_config
    from ..preserve import build_preserve_set

    base = load_model(None)
    sites = tuple(base.sites())
    start = min(s.block for s in sites)
    hypernet, _ = load_hypernet(default_hypernet_for(base), base.identity, sites)
    groups, scanned = _load_groups(cfg, base, start, progress)
    if len(groups) < 2:
        raise UsageError("fewer than two bundled groups have enough failures for a sequential run")
    configs = {"plain": resolve_edit_config(base, {}, "plain"),
               "local": resolve_edit_config(base, {"anchor_weight": cfg.anchor_weight,
                                                   "anchor_views": cfg.anchor_views}, "local")}
    sets = benchmark_sets(base, scanned, check=cfg.check, locality=cfg.locality, preserve=cfg.preserve,
                          with_preserve=any(configs[e].uses_preserve for e in cfg.editors))  # plain never reads it
    cx, c_refs = read_set(sets.check, base, progress, "loading check set")
    check_y = torch.tensor([r.label for r in c_refs])
    check = TokenCache(base.model, start, cx)
    check_base = check.predict()
    loc = TokenCache(base.model, start, read_set(sets.locality, base, progress, "loading locality set")[0])
    loc_base = loc.predict()
    preserve_x = preserve = None
    if sets.preserve is not None:
        preserve_x = read_set(sets.preserve, base, progress, "loading preserve set")[0]
        preserve = build_preserve_set(base.model, sites, preserve_x)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    return _SeqRun(cfg, base, sites, hypernet, configs, groups, check, check_y, check_base,
                   float((check_base == check_y).float().mean()), loc, loc_base, preserve_x, preserve, out, t0, progress)


def _load_groups(cfg: SequentialConfig, base, start: int, progress) -> tuple[list[dict], dict]:
    """Every bundled group (of ``cfg.groups``) with more than ``edit_images`` failures, split by a
    seeded draw into its edit images and its held-out failures; and the groups' image sets."""
    import torch

    from ..demo import examples
    from ..evaluate import TokenCache
    from ..imagesets import failure_group, read_set

    groups, scanned = [], {}
    for g in examples():
        if cfg.groups and g["group"] not in cfg.groups:
            continue
        group = failure_group(base, g["group"], Path(g["path"]))
        x, refs = read_set(group, base, progress, f"loading {g['group']}")
        y = torch.tensor([r.label for r in refs])
        if len(y) <= cfg.edit_images:
            continue
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(_seed(cfg.seed, g["group"])))
        e, h = perm[:cfg.edit_images].sort().values, perm[cfg.edit_images:].sort().values
        groups.append({"group": g["group"], "x_edit": x[e], "y_edit": y[e], "hold": TokenCache(base.model, start, x[h]),
                       "y_hold": y[h], "edit_tokens": TokenCache(base.model, start, x[e]).tokens})
        scanned[g["group"]] = group
    return groups, scanned


def _single_edits(run: _SeqRun, editor: str) -> None:
    """Each group edited alone from the base model: ``run.singles[editor]``."""
    run.singles[editor] = {}
    for g in run.groups:
        model = copy.deepcopy(run.base.model)
        res = run.edit_on(model, g["x_edit"], g["y_edit"], g["edit_tokens"], editor,
                          _seed(run.cfg.seed, g["group"], "single"))
        # caches share the base model's modules: measure with the edited slices substituted
        m = run.measure(res.patch.weights(run.base.model))
        run.singles[editor][g["group"]] = {"generalization": m[g["group"]]["generalization"],
                                           "fixed": m[g["group"]]["fixed"], "check_accuracy": m["check_accuracy"],
                                           "flip_rate": m["flip_rate"], "steps": res.steps,
                                           "success": res.edit_accuracy}
        run.advance()


def _stack_in_order(run: _SeqRun, editor: str, o: int, rows: list[dict]) -> None:
    """The groups edited one on top of the other in seeded order ``o``; a row after every edit."""
    import torch

    from ..history import units_changed

    cfg, sites = run.cfg, run.sites
    order = torch.randperm(len(run.groups), generator=torch.Generator().manual_seed(_seed(cfg.seed, "order", o))).tolist()
    model = copy.deepcopy(run.base.model)
    edited: list[dict] = []
    stack: list = []   # the patches so far: their units are barred with cfg.disjoint
    for step, gi in enumerate(order, start=1):
        g = run.groups[gi]
        kept, anchors = _holds(run, model, editor, step, edited, g, o)
        changed = units_changed(stack)
        res = run.edit_on(model, g["x_edit"], g["y_edit"], g["edit_tokens"], editor,
                          _seed(cfg.seed, g["group"], "sequential", o), kept, anchors,
                          changed if cfg.disjoint else None)
        shared = sum(int(torch.isin(ix, changed[p]).sum()) for p, ix in res.patch.indices.items() if p in changed)
        stack.append(res.patch)
        edited.append(g)
        weights = {s.param: model.get_parameter(s.param).detach() for s in sites}
        m = run.measure(weights)
        per_group = [run.group_figures(h, m, editor, success=_success(run, weights, h)) for h in edited]
        rows.append(run.stack_row(m, per_group, arm="sequential", editor=editor, order=o, step=step,
                                  group=g["group"], steps=res.steps, units=res.patch.units_edited,
                                  shared_units=shared))
        run.partial(rows)
        run.advance()


def _holds(run: _SeqRun, model, editor: str, step: int, edited: list[dict], g: dict, o: int):
    """What the next edit of a stack holds in place: (the preserve set, the anchor set or None).

    Hypernet scores and the edit see the current (stacked) model, as `apply --on-top` does. The
    preserve set keeps the base model's predictions (ordinary images were never meant to change, so
    drift does not compound; ``preserve_targets`` "current" holds what the stack does now instead),
    and the earlier edits' images keep what the stack does on them (``anchor_weight`` > 0)."""
    import torch

    from ..preserve import build_anchor_set, build_preserve_set

    config = run.configs[editor]
    kept = build_preserve_set(model, run.sites, run.preserve_x) if config.uses_preserve \
        and step > 1 and run.cfg.preserve_targets == "current" else run.preserve
    anchors = build_anchor_set(model, run.sites, torch.cat([h["x_edit"] for h in edited]),
                               tokens=torch.cat([h["edit_tokens"] for h in edited]),
                               views=config.anchor_views,
                               seed=_seed(run.cfg.seed, g["group"], "anchors", o)) \
        if config.anchor_weight > 0 and edited else None
    return kept, anchors


def _success(run: _SeqRun, weights: dict, h: dict) -> float:
    """Group ``h``'s edit images classified right under ``weights`` (the stack's matrices)."""
    import torch
    from torch.func import functional_call

    from ..models import make_suffix

    with torch.inference_mode():
        return float((functional_call(make_suffix(run.base.model, run.start), weights, (h["edit_tokens"],))
                      .argmax(-1) == h["y_edit"]).float().mean())


def _batch_edit(run: _SeqRun, editor: str) -> dict:
    """One edit of every group's edit images at once, measured as a stack row."""
    import torch

    model = copy.deepcopy(run.base.model)
    xe = torch.cat([g["x_edit"] for g in run.groups])
    ye = torch.cat([g["y_edit"] for g in run.groups])
    tokens = torch.cat([g["edit_tokens"] for g in run.groups])
    res = run.edit_on(model, xe, ye, tokens, editor, _seed(run.cfg.seed, "batch"))
    m = run.measure({s.param: model.get_parameter(s.param).detach() for s in run.sites})
    per_group = [run.group_figures(h, m, editor) for h in run.groups]
    return run.stack_row(m, per_group, arm="batch", editor=editor, order=None, step=len(run.groups),
                         group="all", steps=res.steps, success=res.edit_accuracy)


def summarize(rows: list[dict], singles: dict, n_groups: int) -> list[dict]:
    """Per editor and arm, after the last edit: mean over orders of the mean retained generalization,
    still-fixed share, check accuracy drop and flip rate (95% CI across orders where there are several),
    and the worst group's retained share."""
    out = []
    for editor in sorted({r["editor"] for r in rows}):
        single = singles[editor]
        out.append({"editor": editor, "arm": "single", "edits": 1,
                    "mean_generalization": mean_ci([d["generalization"] for d in single.values()])[0],
                    "accuracy_drop": None, "flip_rate": mean_ci([d["flip_rate"] for d in single.values()])[0]})
        for arm in ("sequential", "batch"):
            final = [r for r in rows if r["editor"] == editor and r["arm"] == arm and r["step"] == n_groups]
            if not final:
                continue
            entry = {"editor": editor, "arm": arm, "edits": n_groups, "runs": len(final)}
            for k in ("mean_retained", "mean_still_fixed", "mean_generalization", "accuracy_drop", "flip_rate",
                      "check_accuracy", "locality"):
                m, ci = mean_ci([r[k] for r in final])
                entry[k], entry[f"{k}_ci95"] = m, ci
            entry["worst_group_retained"] = min((p["retained"] for r in final for p in r["groups"]
                                                 if p["retained"] is not None), default=None)
            entry["worst_group_still_fixed"] = min((p["still_fixed"] for r in final for p in r["groups"]), default=None)
            out.append(entry)
    return out


def plot_sequential(rows: list[dict], out: Path, base_check: float) -> None:
    """Retained generalization (mean over the groups edited so far) and check accuracy against the
    number of edits, one line per editor and order; batch edits as single markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    colours = {"plain": "tab:red", "local": "tab:blue"}
    for (editor, order) in sorted({(r["editor"], r["order"]) for r in rows if r["arm"] == "sequential"}):
        pts = sorted((r for r in rows if r["arm"] == "sequential" and r["editor"] == editor and r["order"] == order),
                     key=lambda r: r["step"])
        xs = [r["step"] for r in pts]
        kw = dict(color=colours.get(editor), marker="o", alpha=0.8, label=f"{editor}, order {order}")
        axes[0].plot(xs, [r["mean_retained"] for r in pts], **kw)
        axes[1].plot(xs, [r["check_accuracy"] for r in pts], **kw)
    for r in rows:
        if r["arm"] == "batch":
            kw = dict(color=colours.get(r["editor"]), marker="*", s=120, label=f"{r['editor']}, batch")
            axes[0].scatter([r["step"]], [r["mean_retained"]], **kw)
            axes[1].scatter([r["step"]], [r["check_accuracy"]], **kw)
    axes[1].axhline(base_check, color="grey", linestyle="--", linewidth=1, label="base model")
    axes[0].set_ylabel("retained generalization (vs each group's single edit)")
    axes[1].set_ylabel("check-set accuracy")
    for ax in axes:
        ax.set_xlabel("number of edits in the model")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("many edits in one model (vitedit/fashion-vit)", fontsize=9)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
