"""Many edits in one model: recording an edit in the workspace's history (with what it did to every
earlier edit), ``vitedit history`` and ``vitedit revert``. The stack itself is ``vitedit.history``."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..artifacts import save_tensors, sha256_file
from ..edit import Patch
from ..history import History, combine
from ..workspace import Workspace
from .common import Progress, _load_workspace_model, _noop


def _image_entry(ref) -> dict:
    return {"path": str(Path(ref.path).absolute()), "label": None if ref.label is None else int(ref.label),
            "sha256": sha256_file(ref.path)}


def intact_images(entries: list[dict]) -> list[dict]:
    """The recorded image entries (path, label, sha256) whose file is still there with that content."""
    return [e for e in entries if Path(e["path"]).is_file() and sha256_file(e["path"]) == e["sha256"]]


def _remeasure(job, entry: dict, final: dict) -> dict:
    """Edit ``entry``'s success and held-out generalization under the ``final`` weights."""
    import torch

    from ..data import ImageRef, load_tensors
    from ..evaluate import TokenCache, accuracy

    start = min(s.block for s in job.sites)
    dev = next(job.loaded.model.parameters()).device
    out = {"index": entry["index"], "failures": entry["failures_dir"]}
    for key, metric in (("edit_images", "success"), ("holdout", "generalization")):
        refs = [ImageRef(Path(e["path"]), e["label"], None) for e in intact_images(entry.get(key, []))]
        out[f"{metric}_images"] = len(refs)
        if not refs:
            out[metric] = None
            continue
        x, good, _ = load_tensors(refs, job.loaded.transform, job.loaded.channels, skip_bad=True)
        y = torch.tensor([r.label for r in good], dtype=torch.long)
        out[metric] = accuracy(TokenCache(job.loaded.model, start, x.to(dev)).predict(final), y)
    at_the_time = entry.get("metrics", {}).get("generalization")
    out["generalization_at_the_time"] = at_the_time
    out["retained"] = (None if not at_the_time or out["generalization"] is None
                       else round(out["generalization"] / at_the_time, 4))
    return out


_CHECK_KEYS = ("accuracy_before", "accuracy_after", "accuracy_drop", "flip_rate", "accuracy_drop_ci95", "flip_rate_ci95")


def record_edit(job, patch: Patch, point: dict, provenance: dict, progress: Progress = _noop) -> dict:
    """Put ``patch`` on the workspace's stack (``job.stacked`` edits under it, or a fresh history),
    re-measure every earlier edit under the new weights, and write the history, the combined patch
    (``patch.safetensors``) and the edited model. ``job.loaded.model`` is left holding the base weights.
    """
    from ..evaluate import check_metrics, unchanged

    ws, loaded = job.ws, job.loaded
    history = History(ws)
    identity = loaded.identity
    if job.stacked:
        data = history.read(identity)
        stack = history.patches(identity)
    else:
        history.clear()
        data = {"kind": "edit-history", "model": identity, "edits": [],
                "base_check_accuracy": point.get("accuracy_before")}
        stack = []
    for p in reversed(stack):  # the model goes back to the base weights
        p.revert(loaded.model)
    combined = combine(stack + [patch], loaded.model)
    final = combined.weights(loaded.model)

    # What the whole stack does against the base model (the sets' own base predictions were taken on
    # the model this edit started from, so they measure this edit alone).
    sets = job.sets
    cumulative = {"edits": len(stack) + 1}
    if not stack:  # one edit from the base model: the whole stack is this edit, measured already
        if sets.check is not None:
            cumulative.update({k: point[k] for k in _CHECK_KEYS}, check_images=len(sets.check))
        if sets.locality is not None:
            cumulative["locality"] = point["locality"]
    else:
        if sets.check is not None:
            m = check_metrics(sets.check.predict(final), sets.check.predict(), sets.check_labels)
            cumulative.update(m, accuracy_drop=round(100 * (m["accuracy_before"] - m["accuracy_after"]), 4))
        if sets.locality is not None:
            cumulative["locality"] = unchanged(sets.locality.predict(final), sets.locality.predict())
    interference = []
    for i, e in enumerate(data["edits"]):
        progress("re-measuring earlier edits", i, len(data["edits"]))
        interference.append(_remeasure(job, e, final))
    progress("re-measuring earlier edits", len(data["edits"]), len(data["edits"]))

    patch_path = history.next_patch_path(data)
    patch.save(patch_path, identity, {**provenance, "on_top_of": len(stack)})
    index = int(patch_path.stem)
    entry = {"index": index, "patch": str(patch_path.relative_to(ws.root)), "patch_sha256": sha256_file(patch_path),
             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "failures_dir": job.state["failures_dir"], "sparsity": provenance["sparsity"],
             "locator": provenance["locator"], "edit_config": provenance["edit_config"],
             "units_edited": patch.units_edited, "metrics": provenance["metrics"], "cumulative": cumulative,
             "interference": interference,
             "edit_images": [_image_entry(r) for r in job.refs["edit"]],
             "holdout": [_image_entry(r) for r in job.refs["holdout"]]}
    data["edits"].append(entry)
    _write_derived(ws, loaded, combined, {**provenance, "history_edits": len(data["edits"])})
    data["combined_sha256"] = sha256_file(ws.path("patch.safetensors"))
    history.write(data)  # the commit point
    return {"history_index": index, "history_edits": len(data["edits"]), "cumulative": cumulative,
            "interference": interference}


def _write_derived(ws: Workspace, loaded, combined: Patch | None, provenance: dict) -> None:
    """``patch.safetensors`` (the combined patch) and ``edited.safetensors`` (base + stack); none when
    the stack is empty. ``loaded.model`` holds the base weights."""
    if combined is None:
        for name in ("patch.safetensors", "patch.json", "edited.safetensors", "edited.json"):
            if ws.path(name).exists():
                ws.path(name).unlink()
        return
    combined.save(ws.path("patch.safetensors"), loaded.identity, provenance)
    edited_state = dict(loaded.model.state_dict())
    edited_state.update(combined.weights(loaded.model))
    save_tensors(ws.path("edited.safetensors"), edited_state,
                 {"kind": "edited-model", "model": loaded.identity, "architecture": loaded.name,
                  "patch": str(ws.path("patch.safetensors")), **provenance})


def sync(ws: Workspace, loaded) -> bool:
    """Rebuild ``patch.safetensors`` and ``edited.safetensors`` from the history when they do not hold
    what it records (an apply or revert interrupted after its commit point). ``loaded.model`` must
    hold the base weights. Returns whether anything was rewritten."""
    history = History(ws)
    if not history.exists:
        return False
    data = history.read(loaded.identity)
    recorded = data.get("combined_sha256")
    present = sha256_file(ws.path("patch.safetensors")) if ws.path("patch.safetensors").exists() else None
    if recorded == present:
        return False
    stack = history.patches(loaded.identity)
    combined = combine(stack, loaded.model) if stack else None
    _write_derived(ws, loaded, combined, {"history_edits": len(stack), "rebuilt": True, "sparsity": None, "metrics": {}})
    data["combined_sha256"] = sha256_file(ws.path("patch.safetensors")) if combined is not None else None
    history.write(data)
    return True


@dataclass(frozen=True)
class HistoryConfig:
    workspace: Path = Path(".vitedit")
    device: str = "cpu"
    plot: Path | None = None         # write the interference plot (PNG) here


def interference_table(edits: list[dict]) -> list[dict]:
    """One row per edit of the history: after edit k, every edit so far (the newest at its own figure)
    with its retained share, the mean over them, and the stack's check accuracy and drop vs the base."""
    rows = []
    for k, e in enumerate(edits, start=1):
        retained = {int(i["index"]): i["retained"] for i in e["interference"]}
        retained[int(e["index"])] = 1.0  # the newest edit is measured as it was made
        known = [v for v in retained.values() if v is not None]
        c = e.get("cumulative", {})
        rows.append({"edits": k, "index": int(e["index"]), "failures": Path(e["failures_dir"]).name, "retained": retained,
                     "mean_retained": sum(known) / len(known) if known else None,
                     "check_accuracy": c.get("accuracy_after"), "accuracy_drop": c.get("accuracy_drop"),
                     "flip_rate": c.get("flip_rate")})
    return rows


def plot_history(rows: list[dict], out: Path, base_check: float | None, title: str) -> None:
    """Each edit's retained generalization against the number of edits in the model (one line per
    edit, from when it was made), and the stack's check accuracy against the base model's."""
    import matplotlib

    from ..artifacts import atomic_path

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for index, name in [(r["index"], r["failures"]) for r in rows]:
        pts = [(r["edits"], r["retained"][index]) for r in rows if r["retained"].get(index) is not None]
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"edit {index} ({name})")
    axes[0].plot([r["edits"] for r in rows], [r["mean_retained"] for r in rows], color="black", linewidth=2,
                 label="mean")
    axes[0].axhline(0.8, color="grey", linestyle=":", linewidth=1)
    axes[0].set_ylabel("retained generalization (vs when it was made)")
    acc = [(r["edits"], r["check_accuracy"]) for r in rows if r["check_accuracy"] is not None]
    if acc:
        axes[1].plot([a[0] for a in acc], [a[1] for a in acc], marker="o", color="tab:blue", label="stack")
    if base_check is not None:
        axes[1].axhline(base_check, color="grey", linestyle="--", linewidth=1, label="base model")
    axes[1].set_ylabel("check-set accuracy")
    for ax in axes:
        ax.set_xlabel("number of edits in the model")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if not acc and base_check is None:
        axes[1].text(0.5, 0.5, "no check set was measured", ha="center", transform=axes[1].transAxes)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def run_history(cfg: HistoryConfig, progress: Progress = _noop) -> dict:
    """The workspace's edits in order with their figures (as recorded when each was made), the
    interference table (every edit's retained share after each later one) and, with ``plot``, its plot."""
    ws = Workspace(cfg.workspace)
    state = ws.state()
    history = History(ws)
    data = history.read({"name": state["model"]["name"], "weights_sha256": state["model"]["weights_sha256"]})
    table = interference_table(data["edits"])
    if cfg.plot is not None and table:
        plot_history(table, Path(cfg.plot), data.get("base_check_accuracy"),
                     f"{len(table)} edits in {ws.root} ({state['model']['name']})")
    return {"workspace": str(ws.root), "model": state["model"]["name"], "edits": data["edits"],
            "base_check_accuracy": data.get("base_check_accuracy"), "interference_table": table,
            "plot": str(cfg.plot) if cfg.plot is not None and table else None}


@dataclass(frozen=True)
class RevertConfig:
    workspace: Path = Path(".vitedit")
    index: int | None = None         # None: the last edit
    device: str = "cpu"


def run_revert(cfg: RevertConfig, progress: Progress = _noop) -> dict:
    """Remove one edit from the stack (the last, or one no later edit overlaps) and rewrite the
    combined patch and the edited model from what remains; the weights equal the stack without it."""
    ws = Workspace(cfg.workspace)
    with ws.lock():
        state = ws.state()
        loaded = _load_workspace_model(ws, state, cfg.device)
        identity = loaded.identity
        history = History(ws)
        data = history.read(identity)
        if not data["edits"]:
            from ..errors import UsageError

            raise UsageError(f"the workspace {ws.root} holds no edit to revert")
        index = int(data["edits"][-1]["index"]) if cfg.index is None else int(cfg.index)
        history.removable(index, identity)
        pos = [int(e["index"]) for e in data["edits"]].index(index)
        stack = history.patches(identity)
        removed = data["edits"].pop(pos)
        del stack[pos]
        combined = combine(stack, loaded.model) if stack else None
        _write_derived(ws, loaded, combined, {"history_edits": len(stack), "reverted": index,
                                              "sparsity": None, "metrics": {}})
        data["combined_sha256"] = sha256_file(ws.path("patch.safetensors")) if combined is not None else None
        history.write(data)
        ws.path(removed["patch"]).unlink(missing_ok=True)
    return {"reverted": index, "remaining": [int(e["index"]) for e in data["edits"]],
            "patch": str(ws.path("patch.safetensors")) if combined is not None else None}
