"""The model layer: the only module that knows timm internals.

It owns
- loading a ViT from any timm name (with pretrained tag), ``hf-hub:``/``local-dir:`` names, a name plus
  a local weights file (created at the image size its position embedding was trained at, or at
  ``--img-size``), or the embedded default (``vitedit/fashion-vit``);
- the model's identity (name + a hash of its weights), class names and preprocessing;
- the *editable sites* (paper Sec. 3: the MLP of a few late-middle blocks; one mask unit per hidden
  neuron: a row of ``fc1.weight`` or a column of ``fc2.weight``), found by walking ``model.blocks``;
- the split of the forward pass at the first edited block: the frozen prefix is computed once and
  only the suffix is re-run during an edit (``forward_prefix`` / ``Suffix``).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .errors import DownloadError, ModelError, UnsupportedModelError, UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

DEFAULT_MODEL = "vitedit/fashion-vit"
ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_ASSETS = ASSETS / "fashion"

# ----------------------------------------------------------------------------- sites


@dataclass(frozen=True, order=True)
class Site:
    """One editable matrix: ``blocks[block].mlp.<matrix>.weight`` with ``units`` hidden neurons.

    fc1 units are rows (dim 0, all input weights of a hidden neuron); fc2 units are columns (dim 1,
    all output weights of it).
    """

    block: int
    matrix: str  # "fc1" | "fc2"
    units: int

    @property
    def param(self) -> str:
        return f"blocks.{self.block}.mlp.{self.matrix}.weight"

    @property
    def dim(self) -> int:
        return 0 if self.matrix == "fc1" else 1

    def to_json(self) -> dict:
        return {"block": self.block, "matrix": self.matrix, "units": self.units}

    @classmethod
    def from_json(cls, d: dict) -> "Site":
        return cls(int(d["block"]), str(d["matrix"]), int(d["units"]))


def default_blocks(depth: int) -> list[int]:
    """The paper's placement: 3 consecutive blocks ending 2 before the last (7, 8, 9 of 12)."""
    last = max(depth - 3, 0)
    return list(range(max(last - 2, 0), last + 1))


def parse_blocks(text: str | None, depth: int) -> list[int]:
    """``"7,8,9"``, ``"7-9"`` or ``None`` (default placement) -> sorted block indices."""
    if text is None or text.strip() == "":
        return default_blocks(depth)
    blocks: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(p) for p in part.split("-", 1))
                blocks.update(range(lo, hi + 1))
            else:
                blocks.add(int(part))
    except ValueError:
        raise UsageError(f"--blocks {text!r} is not a list of block indices; use e.g. --blocks 7,8,9 or --blocks 7-9") from None
    bad = sorted(b for b in blocks if not 0 <= b < depth)
    if bad or not blocks:
        raise UsageError(f"--blocks {text!r}: the model has blocks 0..{depth - 1}; pick indices in that range")
    return sorted(blocks)


def find_sites(model: "nn.Module", blocks: Sequence[int]) -> list[Site]:
    """Walk ``model.blocks`` and return the fc1/fc2 sites of the chosen blocks, in order."""
    from timm.layers import Mlp

    for i in blocks:
        mlp = getattr(model.blocks[i], "mlp", None)
        if not isinstance(mlp, Mlp) or not hasattr(mlp, "fc1") or not hasattr(mlp, "fc2"):
            raise UnsupportedModelError(
                f"block {i} of {type(model).__name__} has an MLP of type {type(mlp).__name__}, not timm's "
                "Mlp with fc1/fc2; vitedit edits ViT blocks with a plain two-layer MLP (pick other --blocks "
                "or another model)")
    sites = []
    for i in blocks:
        mlp = model.blocks[i].mlp
        sites.append(Site(i, "fc1", mlp.fc1.out_features))
        sites.append(Site(i, "fc2", mlp.fc2.in_features))
    return sites


# ----------------------------------------------------------------------------- split forward


class _StopForward(Exception):
    pass


def forward_prefix(model: "nn.Module", x: "torch.Tensor", start: int) -> "torch.Tensor":
    """Tokens entering ``model.blocks[start]``: (B, C, H, W) -> (B, N, D).

    Runs the model's own ``forward_features`` and stops it at the first edited block with a
    pre-hook, so embedding details (class/register tokens, position embedding) stay timm's.
    """
    captured: list = []

    def hook(_module, args):
        captured.append(args[0])
        raise _StopForward

    handle = model.blocks[start].register_forward_pre_hook(hook)
    try:
        model.forward_features(x)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise UnsupportedModelError(f"{type(model).__name__}.forward_features never reached blocks[{start}]")
    return captured[0]


def site_layer(model: "nn.Module", site: Site) -> "nn.Module":
    """The linear layer of ``site`` (``blocks[i].mlp.fc1`` or ``.fc2``): hooks on it see its inputs."""
    return getattr(model.blocks[site.block].mlp, site.matrix)


def make_suffix(model: "nn.Module", start: int) -> "nn.Module":
    """A module running ``blocks[start:]``, the final norm and the head.

    Its parameter names equal the model's (``blocks.7.mlp.fc1.weight``), so
    ``torch.func.functional_call(suffix, {site.param: w}, (tokens,))`` substitutes edited weights.
    The modules are shared with ``model``, not copied.
    """
    from torch import nn

    class Suffix(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in range(start, len(model.blocks))})
            self.norm = model.norm
            object.__setattr__(self, "_head", model.forward_head)  # not registered: frozen, shared
            object.__setattr__(self, "_classifier", model.get_classifier())

        def forward(self, tokens: "torch.Tensor", pre_logits: bool = False, with_features: bool = False):
            """(B, N, D) -> (B, classes); ``pre_logits``: the (B, D) features instead;
            ``with_features``: both, (features, logits), from one pass."""
            for blk in self.blocks.values():
                tokens = blk(tokens)
            if not with_features:
                return self._head(self.norm(tokens), pre_logits=pre_logits)
            feats = self._head(self.norm(tokens), pre_logits=True)
            return feats, self._classifier(feats)

    return Suffix()


# ----------------------------------------------------------------------------- loaded model


@dataclass
class LoadedModel:
    """A frozen, eval-mode timm ViT with everything vitedit needs to know about it."""

    model: "nn.Module"
    name: str
    labels: list[str]
    data_config: dict
    source: str  # "default", "timm", "weights-file"
    weights_file: str | None = None
    edit_defaults: dict = field(default_factory=dict)
    note: str | None = None  # how the model was built when it is not the obvious way (e.g. an inferred img_size)

    @cached_property
    def weights_sha256(self) -> str:
        return state_dict_sha256(self.model.state_dict())

    @property
    def identity(self) -> dict:
        return {"name": self.name, "weights_sha256": self.weights_sha256}

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    @property
    def channels(self) -> int:
        return int(self.data_config["input_size"][0])

    @property
    def width(self) -> int:
        return int(self.model.num_features)

    @property
    def num_heads(self) -> int:
        return int(self.model.blocks[0].attn.num_heads)

    @cached_property
    def transform(self) -> Callable:
        """PIL image (already in the model's channel mode) -> (C, H, W) tensor, from timm's config."""
        from timm.data import create_transform

        return create_transform(**self.data_config, is_training=False)

    def sites(self, blocks: Sequence[int] | None = None) -> list[Site]:
        return find_sites(self.model, default_blocks(self.depth) if blocks is None else blocks)

    def to(self, device: "torch.device | str") -> "LoadedModel":
        self.model.to(device)
        return self


def state_dict_sha256(state: dict) -> str:
    """sha256 over a state dict (names, dtypes, shapes, bytes): the same for any file format or source."""
    import torch

    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _freeze(model: "nn.Module") -> "nn.Module":
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _check_split(model: "nn.Module", input_size: Sequence[int]) -> None:
    """Refuse models whose forward is not embed -> blocks -> norm -> head (the split would lie).

    ``input_size`` is (C, H, W) from the model's data config (not ``pretrained_cfg``, which keeps the
    source checkpoint's size when the model was created at another one).
    """
    import torch

    for attr in ("blocks", "forward_features", "forward_head", "norm"):
        if not hasattr(model, attr):
            raise UnsupportedModelError(
                f"{type(model).__name__} has no `{attr}`; vitedit supports timm Vision Transformers "
                "(VisionTransformer and its variants with `blocks`, `norm`, `forward_head`)")
    size = tuple(int(v) for v in input_size)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, *size, generator=gen)
    start = len(model.blocks) // 2
    with torch.inference_mode():
        full = model(x)
        split = make_suffix(model, start)(forward_prefix(model, x, start))
    if not torch.allclose(full, split, atol=1e-4, rtol=1e-4):
        raise UnsupportedModelError(
            f"{type(model).__name__}'s forward is not embed -> blocks -> norm -> head, so vitedit cannot "
            "split it at the edited blocks; use a timm VisionTransformer-family model")


def _labels_for(model: "nn.Module", labels_file: Path | None, cfg_labels: Sequence[str] | None = None) -> list[str]:
    n = int(getattr(model, "num_classes", 0))
    if labels_file is not None:
        labels = read_labels_file(labels_file)
    elif cfg_labels:
        labels = list(cfg_labels)
    else:
        labels = _timm_label_names(model)
    if labels is None:
        return [str(i) for i in range(n)]
    if len(labels) != n:
        raise UsageError(f"--labels gives {len(labels)} class names but the model has {n} classes; "
                         "pass a file with one name per class")
    return labels


def read_labels_file(path: Path) -> list[str]:
    """One class name per line, or a JSON list."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--labels {path}: file not found; pass a text file with one class name per line")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            labels = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"--labels {path}: invalid JSON ({e}); give a JSON list or one name per line") from None
        return [str(x) for x in labels]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _timm_label_names(model: "nn.Module") -> list[str] | None:
    """Class names from the model's pretrained config or timm's ImageNet metadata, if any."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    if cfg.get("label_names"):
        return list(cfg["label_names"])
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if subset:
            return [d.split(",")[0].strip() for d in ImageNetInfo(subset).label_descriptions()]
    except (ImportError, ValueError, KeyError, FileNotFoundError):
        pass
    return None


def read_state_dict(path: Path) -> dict:
    """A state dict from safetensors or a torch file loaded with ``weights_only=True`` (never unpickled)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"--weights {path}: file not found; check the path")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelError(f"--weights {path} is not a readable safetensors file ({e}); re-download it") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or pickled-object files
        raise ModelError(f"--weights {path} cannot be read as a weights-only torch file ({type(e).__name__}); "
                         "convert it to safetensors or a plain state dict") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
        raise ModelError(f"--weights {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _suggest_models(name: str) -> str:
    import timm

    base = name.split(".")[0]
    close = difflib.get_close_matches(base, timm.list_models(), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def load_model(name: str | None = None, *, weights: Path | None = None, labels_file: Path | None = None,
               device: str = "cpu", offline: bool | None = None, img_size: int | None = None) -> LoadedModel:
    """Load and freeze a ViT. ``name=None`` is the embedded default.

    With a weights file the model is created at the image size the file's position embedding was
    trained at (``LoadedModel.note`` says so when that is not the architecture's default), or at
    ``img_size`` when given.
    """
    if img_size is not None:
        if weights is None:
            raise UsageError("--img-size applies to a --weights file (the size it was trained at); drop it, "
                             "or pass --model NAME --weights FILE")
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
            raise UsageError(f"--img-size {img_size!r}: give the image side in pixels, e.g. --img-size 224")
    if name is None or name == DEFAULT_MODEL:
        if weights is not None:
            raise UsageError("--weights needs --model NAME naming the timm architecture of that file")
        loaded = _load_default(labels_file)
    elif weights is not None:
        loaded = _load_with_weights(name, Path(weights), labels_file, img_size)
    else:
        loaded = _load_timm(name, labels_file, offline)
    _freeze(loaded.model)
    _check_split(loaded.model, loaded.data_config["input_size"])
    find_sites(loaded.model, default_blocks(loaded.depth))
    return loaded.to(device)


def _create(name: str, **kwargs) -> "nn.Module":
    import timm

    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ModelError(f"unknown timm model {name!r}{_suggest_models(name)}; see `timm.list_models()`") from None
        raise


def _load_default(labels_file: Path | None) -> LoadedModel:
    meta_path = DEFAULT_ASSETS / "model.json"
    if not meta_path.exists():
        raise ModelError(f"the embedded default model is missing from this installation ({meta_path}); "
                         "reinstall vitedit or pass --model NAME")
    meta = json.loads(meta_path.read_text())
    overlay = dict(file=str(DEFAULT_ASSETS / "model.safetensors"), custom_load=False, num_classes=len(meta["labels"]),
                   label_names=meta["labels"], **meta["data_config"])
    model = _create(meta["architecture"], pretrained=True, pretrained_cfg_overlay=overlay, **meta["model_kwargs"])
    from timm.data import resolve_model_data_config

    return LoadedModel(model, DEFAULT_MODEL, _labels_for(model, labels_file, meta["labels"]),
                       resolve_model_data_config(model), "default", edit_defaults=meta.get("edit_defaults", {}))


def _load_with_weights(name: str, path: Path, labels_file: Path | None, img_size: int | None = None) -> LoadedModel:
    state = read_state_dict(path)
    kwargs: dict[str, Any] = {}
    head = state.get("head.weight")
    if head is not None and head.ndim == 2:
        kwargs["num_classes"] = int(head.shape[0])
    note = None
    if img_size is not None:
        kwargs["img_size"] = img_size
        model = _create(name, pretrained=False, **kwargs)
        note = f"{name} created at --img-size {img_size}"
    else:
        model = _create(name, pretrained=False, **kwargs)
        inferred = checkpoint_img_size(model, state, f"--weights {path}")
        if inferred is not None:
            default = _img_size_of(model)
            kwargs["img_size"] = inferred
            model = _create(name, pretrained=False, **kwargs)
            note = (f"{name} created at img_size {_size_text(inferred)} (its default is {default}): the "
                    f"position embedding in {path.name} is a grid for that size; pass --img-size N to choose another")
    own = model.state_dict()
    wrong_shape = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if wrong_shape:
        k = wrong_shape[0]
        fix = ("pass the --model it was trained as, or --img-size N with the image size it was trained at"
               if k == "pos_embed" else "pass the --model it was trained as")
        raise ModelError(f"--weights {path} does not fit {name}"
                         f"{' at img_size ' + _size_text(kwargs['img_size']) if 'img_size' in kwargs else ''}: "
                         f"{len(wrong_shape)} tensors have other shapes (e.g. {k}: {tuple(state[k].shape)} in the file, "
                         f"{tuple(own[k].shape)} in the model); {fix}")
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing {len(result.missing_keys)} (e.g. {result.missing_keys[0]})")
        if result.unexpected_keys:
            parts.append(f"unexpected {len(result.unexpected_keys)} (e.g. {result.unexpected_keys[0]})")
        raise ModelError(f"--weights {path} does not fit {name}: {', '.join(parts)}; pass the --model it was "
                         "trained as")
    from timm.data import resolve_model_data_config

    data_args = None
    if "img_size" in kwargs:  # pretrained_cfg keeps the architecture's default size; preprocess at the real one
        h, w = _pair(kwargs["img_size"])
        data_args = {"input_size": (int(getattr(model, "in_chans", 3)), h, w)}
    return LoadedModel(model, name, _labels_for(model, labels_file), resolve_model_data_config(model, args=data_args),
                       "weights-file", weights_file=str(path), note=note)


def checkpoint_img_size(model: "nn.Module", state: dict, what: str) -> int | tuple[int, int] | None:
    """The image size a ViT state dict was trained at, read from its position embedding, or ``None``
    when its position embedding already fits ``model`` (or there is none to read).

    The grid is ``pos_embed`` tokens minus the prefix (class/register) tokens that carry a position
    (none when the architecture has ``no_embed_class``); the patch size is the kernel of
    ``patch_embed.proj.weight``. A grid that is not square raises ``ModelError`` naming ``--img-size``.
    """
    file_pos, own_pos = state.get("pos_embed"), getattr(model, "pos_embed", None)
    if file_pos is None or own_pos is None or tuple(file_pos.shape) == tuple(own_pos.shape):
        return None
    if file_pos.ndim != 3 or own_pos.ndim != 3 or file_pos.shape[-1] != own_pos.shape[-1]:
        return None  # another width or layout: another architecture, reported by the shape check
    kernel = state.get("patch_embed.proj.weight")
    model_patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if kernel is None or kernel.ndim != 4 or model_patch is None or tuple(kernel.shape[-2:]) != _pair(model_patch):
        return None  # other patches: another architecture, reported by the shape check
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 0))
    positions = int(file_pos.shape[1]) - prefix
    side = math.isqrt(positions) if positions > 0 else 0
    if side < 1 or side * side != positions:
        raise ModelError(f"{what}: its pos_embed has {int(file_pos.shape[1])} tokens, {positions} patch positions "
                         f"after {prefix} prefix token(s), which is not a square grid; pass --img-size N with the "
                         "image size it was trained at")
    ph, pw = _pair(model_patch)
    return side * ph if ph == pw else (side * ph, side * pw)


def _pair(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _size_text(size) -> str:
    h, w = _pair(size)
    return str(h) if h == w else f"{h}x{w}"


def _img_size_of(model: "nn.Module") -> str:
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    return _size_text(size) if size is not None else "another"


def _load_timm(name: str, labels_file: Path | None, offline: bool | None) -> LoadedModel:
    import os

    from timm.data import resolve_model_data_config

    if name.startswith("local-dir:"):
        folder = Path(name.split(":", 1)[1])
        if not folder.is_dir():
            raise ModelError(f"{name}: folder not found; local-dir: needs a folder with config.json and weights")
    previous = os.environ.get("HF_HUB_OFFLINE")
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        model = _create(name, pretrained=True)
    except ModelError:
        raise
    except (OSError, RuntimeError, ValueError) as e:
        raise DownloadError(
            f"could not fetch pretrained weights for {name} ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
            "check the network, or pass --weights FILE with a local copy (HF_HUB_OFFLINE uses only the cache)") from None
    finally:
        if offline:
            if previous is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = previous
    return LoadedModel(model, name, _labels_for(model, labels_file), resolve_model_data_config(model), "timm")


# ----------------------------------------------------------------------------- timm layout
# Other modules reach timm's attribute names (blocks, mlp, patch_embed) only through these.


def replace_site_layer(model: "nn.Module", site: Site, make: Callable[["nn.Module"], "nn.Module"]) -> "nn.Module":
    """Put ``make(layer)`` in place of ``site``'s linear layer (``blocks[i].mlp.fc1`` or ``.fc2``) and
    return it."""
    mlp = model.blocks[site.block].mlp
    new = make(getattr(mlp, site.matrix))
    setattr(mlp, site.matrix, new)
    return new


def patch_grid(model: "nn.Module") -> tuple[tuple[int, int], tuple[int, int]]:
    """((grid_h, grid_w), (patch_h, patch_w)) read from the model's patch embedding."""
    pe = model.patch_embed
    grid = tuple(int(g) for g in pe.grid_size)
    patch = tuple(int(p) for p in pe.patch_size)
    return grid, patch
