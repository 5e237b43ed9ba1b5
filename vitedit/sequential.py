"""``vitedit benchmark --sequential``: many edits in one model, and what they do to each other.

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
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .artifacts import atomic_path, portable_path, write_json
from .errors import UsageError

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


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def run_sequential(cfg: SequentialConfig, progress: Callable[[str, int, int], None]) -> dict:
    import torch
    from torch.func import functional_call

    from .benchmark import mean_ci
    from .data import load_tensors, scan_labeled, scan_unlabeled
    from .demo import examples
    from .edit import edit
    from .evaluate import TokenCache
    from .hypernet import load_hypernet
    from .masks import UnitScores
    from .models import load_model
    from .pipeline import (check_disjoint, default_check_dir, default_hypernet_for, default_locality_dir,
                           default_preserve_dir, resolve_edit_config)
    from .history import units_changed
    from .preserve import build_anchor_set, build_preserve_set

    t0 = time.time()
    base = load_model(None)
    sites = tuple(base.sites())
    start = min(s.block for s in sites)
    hypernet, _ = load_hypernet(default_hypernet_for(base), base.identity, sites)

    def load(refs, what):
        x, good, _ = load_tensors(refs, base.transform, base.channels, progress=lambda d, t: progress(what, d, t))
        return x, torch.tensor([r.label for r in good]) if good and good[0].label is not None else None, good

    groups = []
    for g in examples():
        if cfg.groups and g["group"] not in cfg.groups:
            continue
        x, y, _ = load(scan_labeled(Path(g["path"]), base.labels), f"loading {g['group']}")
        if len(y) <= cfg.edit_images:
            continue
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(_seed(cfg.seed, g["group"])))
        e, h = perm[:cfg.edit_images].sort().values, perm[cfg.edit_images:].sort().values
        groups.append({"group": g["group"], "x_edit": x[e], "y_edit": y[e], "hold": TokenCache(base.model, start, x[h]),
                       "y_hold": y[h], "edit_tokens": TokenCache(base.model, start, x[e]).tokens})
    if len(groups) < 2:
        raise UsageError("fewer than two bundled groups have enough failures for a sequential run")
    check_dir = Path(cfg.check) if cfg.check else default_check_dir(base)
    cx, cy, c_refs = load(scan_labeled(check_dir, base.labels), "loading check set")
    check = TokenCache(base.model, start, cx)
    check_base = check.predict()
    loc_x, _, _ = load(scan_unlabeled(Path(cfg.locality) if cfg.locality else default_locality_dir(base)),
                       "loading locality set")
    loc = TokenCache(base.model, start, loc_x)
    loc_base = loc.predict()
    configs = {"plain": resolve_edit_config(base, {}, "plain"),
               "local": resolve_edit_config(base, {"anchor_weight": cfg.anchor_weight,
                                                           "anchor_views": cfg.anchor_views}, "local")}
    preserve_x = preserve = None
    if any(configs[e].uses_preserve for e in cfg.editors):  # the plain editor never reads it
        preserve_dir = Path(cfg.preserve) if cfg.preserve else default_preserve_dir(base)
        p_refs = scan_unlabeled(preserve_dir)
        check_disjoint(preserve_dir, p_refs, {"check set": (check_dir, c_refs)})
        preserve_x = load(p_refs, "loading preserve set")[0]
        preserve = build_preserve_set(base.model, sites, preserve_x)

    def measure(weights: dict) -> dict:
        """Every set under ``weights`` (all edited matrices of the current model) substituted into the
        base model's suffix: the blocks before the first edited one never change, so the cached prefix
        tokens stay exact."""
        pred = check.predict(weights)
        out = {"check_accuracy": float((pred == cy).float().mean()),
               "flip_rate": float((pred != check_base).float().mean()),
               "locality": float((loc.predict(weights) == loc_base).float().mean())}
        for g in groups:
            p = g["hold"].predict(weights)
            out[g["group"]] = {"generalization": float((p == g["y_hold"]).float().mean()), "fixed": (p == g["y_hold"])}
        return out

    def scores_on(model, x_edit_tokens):
        with torch.no_grad():
            feats = make_suffix_of(model)(x_edit_tokens, pre_logits=True)
            sc = hypernet(feats)
        return UnitScores(sites, {s.param: v.mean(0) for s, v in zip(sites, sc)}, "hypernet")

    from .models import make_suffix

    def make_suffix_of(model):
        return make_suffix(model, start)

    def edit_on(model, xe, ye, tokens, editor, seed, kept=None, anchors=None, exclude=None):
        mask = scores_on(model, tokens).select(cfg.sparsity, exclude)
        res = edit(model, mask, xe, ye, configs[editor], tokens=tokens,
                   preserve=(kept if kept is not None else preserve) if configs[editor].uses_preserve else None,
                   seed=seed, anchors=anchors)
        res.patch.apply(model)  # in place: the next edit starts here
        return res

    def group_figures(h: dict, m: dict, editor: str, **first) -> dict:
        """Group ``h`` after a stack measured as ``m``, against its single edit (retained, still fixed)."""
        single = singles[editor][h["group"]]
        gen = m[h["group"]]["generalization"]
        still = (m[h["group"]]["fixed"] & single["fixed"]).sum() / max(int(single["fixed"].sum()), 1)
        return {"group": h["group"], **first, "generalization": gen,
                "single_generalization": single["generalization"],
                "retained": gen / single["generalization"] if single["generalization"] else None,
                "still_fixed": float(still)}

    def stack_row(m: dict, per_group: list[dict], **head) -> dict:
        """One row of the results: the stack's check and locality figures and the means over its groups."""
        return {**head, "check_accuracy": m["check_accuracy"],
                "accuracy_drop": round(100 * (base_check - m["check_accuracy"]), 4),
                "flip_rate": m["flip_rate"], "locality": m["locality"], "groups": per_group,
                "mean_retained": mean_ci([p["retained"] for p in per_group])[0],
                "mean_still_fixed": mean_ci([p["still_fixed"] for p in per_group])[0],
                "mean_generalization": mean_ci([p["generalization"] for p in per_group])[0]}

    base_check = float((check_base == cy).float().mean())
    rows: list[dict] = []
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    def partial(rows: list[dict]) -> None:
        """The rows so far, so that an interrupted run still leaves its figures (rewritten atomically)."""
        write_json(out / "sequential.partial.json", {
            "model": base.name, "rows": rows, "wall_seconds": round(time.time() - t0, 1),
            "singles": {e: {g: {k: v for k, v in d.items() if k != "fixed"} for g, d in s.items()}
                        for e, s in singles.items()}})
    singles: dict[str, dict] = {}
    editors = list(cfg.editors)
    total = len(editors) * (len(groups) * (1 + cfg.orders) + (1 if cfg.batch else 0))
    done = 0
    for editor in editors:
        singles[editor] = {}
        for g in groups:  # single edits from the base model
            model = copy.deepcopy(base.model)
            res = edit_on(model, g["x_edit"], g["y_edit"], g["edit_tokens"], editor, _seed(cfg.seed, g["group"], "single"))
            # caches share the base model's modules: measure with the edited slices substituted
            weights = res.patch.weights(base.model)
            m = measure(weights)
            singles[editor][g["group"]] = {"generalization": m[g["group"]]["generalization"],
                                           "fixed": m[g["group"]]["fixed"], "check_accuracy": m["check_accuracy"],
                                           "flip_rate": m["flip_rate"], "steps": res.steps,
                                           "success": res.edit_accuracy}
            done += 1
            progress("sequential benchmark", done, total)
        for o in range(cfg.orders):
            order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(_seed(cfg.seed, "order", o))).tolist()
            model = copy.deepcopy(base.model)
            edited: list[dict] = []
            stack: list = []   # the patches so far: their units are barred with cfg.disjoint
            for step, gi in enumerate(order, start=1):
                g = groups[gi]
                # hypernet scores and the edit see the current (stacked) model, as `apply --on-top`
                # does. The preserve set keeps the base model's predictions (ordinary images were
                # never meant to change, so drift does not compound; cfg.preserve_targets "current"
                # holds what the stack does now instead) ...
                kept = build_preserve_set(model, sites, preserve_x) if configs[editor].uses_preserve \
                    and step > 1 and cfg.preserve_targets == "current" else preserve
                # ... and the earlier edits' images keep what the stack does on them (anchor_weight > 0)
                anchors = build_anchor_set(model, sites, torch.cat([h["x_edit"] for h in edited]),
                                           tokens=torch.cat([h["edit_tokens"] for h in edited]),
                                           views=configs[editor].anchor_views,
                                           seed=_seed(cfg.seed, g["group"], "anchors", o)) \
                    if configs[editor].anchor_weight > 0 and edited else None
                changed = units_changed(stack)
                res = edit_on(model, g["x_edit"], g["y_edit"], g["edit_tokens"], editor,
                              _seed(cfg.seed, g["group"], "sequential", o), kept, anchors,
                              changed if cfg.disjoint else None)
                shared = sum(int(torch.isin(ix, changed[p]).sum()) for p, ix in res.patch.indices.items() if p in changed)
                stack.append(res.patch)
                edited.append(g)
                weights = {s.param: model.get_parameter(s.param).detach() for s in sites}
                m = measure(weights)
                per_group = []
                for h in edited:
                    with torch.inference_mode():
                        succ = float((functional_call(make_suffix_of(base.model), weights, (h["edit_tokens"],))
                                      .argmax(-1) == h["y_edit"]).float().mean())
                    per_group.append(group_figures(h, m, editor, success=succ))
                rows.append(stack_row(m, per_group, arm="sequential", editor=editor, order=o, step=step,
                                      group=g["group"], steps=res.steps, units=res.patch.units_edited,
                                      shared_units=shared))
                partial(rows)
                done += 1
                progress("sequential benchmark", done, total)
        if cfg.batch:  # all groups' edit images in one edit
            model = copy.deepcopy(base.model)
            xe = torch.cat([g["x_edit"] for g in groups])
            ye = torch.cat([g["y_edit"] for g in groups])
            tokens = torch.cat([g["edit_tokens"] for g in groups])
            res = edit_on(model, xe, ye, tokens, editor, _seed(cfg.seed, "batch"))
            weights = {s.param: model.get_parameter(s.param).detach() for s in sites}
            m = measure(weights)
            per_group = [group_figures(h, m, editor) for h in groups]
            rows.append(stack_row(m, per_group, arm="batch", editor=editor, order=None, step=len(groups),
                                  group="all", steps=res.steps, success=res.edit_accuracy))
            partial(rows)
            done += 1
            progress("sequential benchmark", done, total)

    summary = summarize(rows, singles, len(groups))
    result = {"model": base.name, "groups": [g["group"] for g in groups], "edit_images": cfg.edit_images,
              "held_out": {g["group"]: len(g["y_hold"]) for g in groups},
              "orders": cfg.orders, "sparsity": cfg.sparsity, "base_check_accuracy": base_check,
              "check_images": len(cy), "check": "bundled test sample" if cfg.check is None else portable_path(cfg.check),
              "config": {k: (list(v) if isinstance(v, tuple) else portable_path(v) if isinstance(v, Path) else v)
                         for k, v in asdict(cfg).items()},
              "edit_configs": {k: v.to_json() for k, v in configs.items()},
              "singles": {e: {g: {k: v for k, v in d.items() if k != "fixed"} for g, d in s.items()}
                          for e, s in singles.items()},
              "rows": rows, "summary": summary, "wall_seconds": round(time.time() - t0, 1)}
    write_json(out / "sequential.json", result)
    (out / "sequential.partial.json").unlink(missing_ok=True)
    plot_sequential(rows, out / "sequential.png", base_check)
    result["out"] = str(out)
    return result


def summarize(rows: list[dict], singles: dict, n_groups: int) -> list[dict]:
    """Per editor and arm, after the last edit: mean over orders of the mean retained generalization,
    still-fixed share, check accuracy drop and flip rate (95% CI across orders where there are several),
    and the worst group's retained share."""
    from .benchmark import mean_ci

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
