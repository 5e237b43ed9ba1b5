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


def _remeasure(job, entry: dict, final: dict) -> dict:
    """Edit ``entry``'s success and held-out generalization under the ``final`` weights."""
    import torch

    from ..data import ImageRef, load_tensors
    from ..evaluate import TokenCache, accuracy

    start = min(s.block for s in job.sites)
    dev = next(job.loaded.model.parameters()).device
    out = {"index": entry["index"], "failures": entry["failures_dir"]}
    for key, metric in (("edit_images", "success"), ("holdout", "generalization")):
        refs = [ImageRef(Path(e["path"]), e["label"], None) for e in entry.get(key, [])
                if Path(e["path"]).is_file() and sha256_file(e["path"]) == e["sha256"]]
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


def record_edit(job, patch: Patch, point: dict, provenance: dict, progress: Progress = _noop) -> dict:
    """Put ``patch`` on the workspace's stack (``job.stacked`` edits under it, or a fresh history),
    re-measure every earlier edit under the new weights, and write the history, the combined patch
    (``patch.safetensors``) and the edited model. ``job.loaded.model`` is left holding the base weights.
    """
    from ..evaluate import accuracy, unchanged

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
    if sets.check is not None:
        base_pred, pred = sets.check.predict(), sets.check.predict(final)
        cumulative["accuracy_before"] = accuracy(base_pred, sets.check_labels)
        cumulative["accuracy_after"] = accuracy(pred, sets.check_labels)
        cumulative["accuracy_drop"] = round(100 * (cumulative["accuracy_before"] - cumulative["accuracy_after"]), 4)
        cumulative["flip_rate"] = round(1 - unchanged(pred, base_pred), 6)
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


def run_history(cfg: HistoryConfig, progress: Progress = _noop) -> dict:
    """The workspace's edits in order with their figures (as recorded when each was made)."""
    ws = Workspace(cfg.workspace)
    state = ws.state()
    history = History(ws)
    data = history.read({"name": state["model"]["name"], "weights_sha256": state["model"]["weights_sha256"]})
    return {"workspace": str(ws.root), "model": state["model"]["name"], "edits": data["edits"],
            "base_check_accuracy": data.get("base_check_accuracy")}


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
