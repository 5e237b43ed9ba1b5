"""The edit history of a workspace: an ordered stack of sparse patches on one base model.

Semantics (docs/cli.md, "Many edits in one model"):

- ``vitedit apply`` after a plain ``locate`` starts from the unedited model and makes the history one
  edit long (the paper's protocol: every edit from the base). ``locate --on-top`` scores failures
  with the current edited model and keeps the history; ``apply`` then fits the new edit on top
  of it, so edit *k*'s "old" slices are the values after edits 1..k-1.
- The stack is the source of truth. ``history.json`` lists every edit: its patch file
  (``patches/NNN.safetensors``, with its sha256), the failure folder, the settings, the edit and
  held-out images (path, label, sha256, to re-measure it later) and its figures at the time,
  including what every earlier edit scored right after it (interference).
- ``combined``: one patch over the union of the stack's units, old values from the base and new
  values from the whole stack. Applying it equals applying the stack in order, bit for bit; it is
  what ``patch.safetensors`` holds, so ``export`` and ``vitedit patch`` ship the whole stack.
- Reverting the last edit, or any edit whose units no later edit touches, removes it; the weights are
  then exactly those of the stack without it. An edit whose units a later edit changed cannot be
  removed alone (the later edit was fitted on top of it): that is refused, naming the later edit.

Writes are ordered so an interruption never loses the previous history: a new edit's patch file is
written first (a new name), then ``history.json`` atomically (the commit point); the derived files
(``patch.safetensors``, ``edited.safetensors``) are rewritten after, and :meth:`History.sync`
rebuilds them whenever their hash does not match what the history records.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .artifacts import read_json, sha256_file, write_json
from .edit import Patch
from .errors import ArtifactError, UsageError, WorkspaceError

if TYPE_CHECKING:
    from torch import nn

    from .workspace import Workspace

HISTORY = "history.json"
PATCHES = "patches"


def units_changed(patches: Sequence[Patch]) -> dict[str, "torch.Tensor"]:
    """Per parameter, the sorted union of the units ``patches`` edit."""
    import torch

    params = dict.fromkeys(param for p in patches for param in p.indices)
    return {param: torch.unique(torch.cat([p.indices[param] for p in patches if param in p.indices])).sort().values
            for param in params}


def combine(patches: Sequence[Patch], base: "nn.Module") -> Patch:
    """One patch equal to applying ``patches`` in order to ``base`` (which is not changed).

    Per site: indices are the sorted union of the stack's units; old values come from ``base``; new
    values are the weights after the whole stack, each patch checked to apply to the state before it.
    """
    import torch

    if not patches:
        raise UsageError("there is no edit to combine")
    sites = {}
    for p in patches:
        for s in p.sites:
            if sites.setdefault(s.param, s) != s:
                raise ArtifactError(f"the edits disagree about {s.param} ({sites[s.param]} vs {s}); they were made for "
                                    "different models")
    weights = {param: base.get_parameter(param).detach().clone() for param in sites}
    base_w = {param: w.clone() for param, w in weights.items()}
    for n, p in enumerate(patches, start=1):
        for s in p.sites:
            w, idx = weights[s.param], p.indices[s.param].to(weights[s.param].device)
            if not torch.equal(w.index_select(s.dim, idx), p.old[s.param].to(w.device, w.dtype)):
                raise ArtifactError(f"edit {n} of the history does not apply to the state before it ({s.param}); the "
                                    "history is damaged: revert it or start again with `vitedit locate`")
            w.index_copy_(s.dim, idx, p.new[s.param].to(w.device, w.dtype))
    indices, old, new = units_changed(patches), {}, {}
    for param, s in sites.items():
        idx = indices[param]
        old[param] = base_w[param].index_select(s.dim, idx.to(base_w[param].device)).cpu()
        new[param] = weights[param].index_select(s.dim, idx.to(weights[param].device)).cpu()
    ordered = tuple(sorted(sites.values()))
    return Patch(ordered, indices, new, old)


def overlapping(a: Patch, b: Patch) -> list[str]:
    """Parameters where ``a`` and ``b`` edit at least one common unit."""
    import torch

    out = []
    for param, idx in a.indices.items():
        other = b.indices.get(param)
        if other is not None and bool(torch.isin(idx, other).any()):
            out.append(param)
    return out


class History:
    """The stack of edits in a workspace (``history.json`` + ``patches/``)."""

    def __init__(self, ws: "Workspace") -> None:
        self.ws = ws
        self.path = ws.path(HISTORY)

    @property
    def exists(self) -> bool:
        return self.path.exists()

    def read(self, identity: dict | None = None) -> dict:
        if not self.exists:
            return {"kind": "edit-history", "model": identity, "edits": []}
        data = read_json(self.path, "edit history")
        if data.get("kind") != "edit-history" or not isinstance(data.get("edits"), list):
            raise ArtifactError(f"{self.path} is not a vitedit edit history; remove it or start again with "
                                "`vitedit locate`")
        if identity is not None and data.get("model") != identity:
            theirs = data.get("model") or {}
            raise WorkspaceError(f"the edit history in {self.ws.root} was made for {theirs.get('name')} (weights "
                                 f"{str(theirs.get('weights_sha256'))[:12]}), not {identity['name']} (weights "
                                 f"{identity['weights_sha256'][:12]}); use another --workspace")
        return data

    def patches(self, identity: dict) -> list[Patch]:
        """The stack's patches in order, each checked against its recorded sha256 and the model."""
        out = []
        for e in self.read(identity)["edits"]:
            path = self.ws.path(e["patch"])
            if not path.is_file():
                raise ArtifactError(f"edit {e['index']}'s patch {path} is missing; the history is damaged (start again "
                                    "with `vitedit locate`)")
            if sha256_file(path) != e["patch_sha256"]:
                raise ArtifactError(f"edit {e['index']}'s patch {path} has changed since it was recorded; the history is "
                                    "damaged (start again with `vitedit locate`)")
            out.append(Patch.load(path, identity)[0])
        return out

    def apply_stack(self, model: "nn.Module", identity: dict) -> int:
        """Write the whole stack into ``model`` (in place, which must hold the base weights)."""
        stack = self.patches(identity)
        for p in stack:
            p.apply(model)
        return len(stack)

    def write(self, data: dict) -> None:
        write_json(self.path, data)

    def clear(self) -> None:
        """Forget every edit (a new job from the base model)."""
        import shutil

        if self.path.exists():
            self.path.unlink()
        folder = self.ws.path(PATCHES)
        if folder.is_dir():
            shutil.rmtree(folder)

    def next_patch_path(self, data: dict) -> Path:
        n = max([int(e["index"]) for e in data["edits"]] + [0]) + 1
        path = self.ws.path(PATCHES) / f"{n:03d}.safetensors"
        while path.exists():  # a leftover of an interrupted apply: never reuse a name
            n += 1
            path = self.ws.path(PATCHES) / f"{n:03d}.safetensors"
        return path

    def removable(self, index: int, identity: dict) -> None:
        """Raise unless edit ``index`` can be reverted alone (no later edit touches its units)."""
        data = self.read(identity)
        indices = [int(e["index"]) for e in data["edits"]]
        if index not in indices:
            raise UsageError(f"there is no edit {index} in the history of {self.ws.root} (edits: "
                             f"{', '.join(map(str, indices)) or 'none'}); see `vitedit history`")
        stack = self.patches(identity)
        pos = indices.index(index)
        for later_index, later in zip(indices[pos + 1:], stack[pos + 1:]):
            shared = overlapping(stack[pos], later)
            if shared:
                raise UsageError(f"edit {index} cannot be reverted alone: edit {later_index} (made on top of it) changed "
                                 f"some of the same units ({shared[0]}); revert edit {later_index} first (edits made with "
                                 "`apply --on-top --disjoint` share no unit)")
