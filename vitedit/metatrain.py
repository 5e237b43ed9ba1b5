"""Meta-training the hypernetwork: learning where to edit, label-free (paper Sec. 3.2; method.md).

For each meta-batch of ``batch`` pseudo-samples:

1. **CutMix pseudo-failure.** A patch-aligned box (side lengths drawn on the model's own patch grid)
   from a donor image is pasted into a base image. The target is the frozen model's soft prediction
   on the clean base image at temperature T; the pseudo-edit must make the mixed image look clean:
   ``T^2 KL(softmax(f(clean)/T) || softmax(f_edit(mixed)/T))``. Options beyond the paper:
   ``pseudo="shift"`` (a whole-image warp and tone change instead of a box) or ``"mix"``.
2. **Label masks by first-order bi-level optimization.** Free logits ``z ~ U(-1, 1)`` per unit and
   sample; for ``outer_steps`` steps (RMSprop): ``m = sigmoid(10 z)``; ``inner_steps`` steps of
   soft-masked SGD ``w <- w - inner_lr * m * grad`` from the pretrained weights; outer loss
   ``KL(w_inner) + lambda * mean(m)``, differentiated through ``m`` only (the inner gradients are
   constants: first order). The label mask is ``sigmoid(3 z)``, detached. Optional outer-loss terms
   (both 0 by default, the paper's objective): ``locality_weight`` (the KL the pseudo-edit causes on
   another clean image) and ``generalization_weight`` (the KL it leaves on a same-class image given
   the same corruption).
3. **Fit the hypernetwork** to the label masks with BCE (RMSprop, cosine schedule), fed the final
   [CLS] feature of the *mixed* image (what it will see for a real failure).

Vectorization: every pseudo-sample owns a copy of the edited matrices, held as one batched tensor
``(B, out, in)``; the edited ``fc1``/``fc2`` layers of a private copy of the model are swapped for
``PerSampleLinear`` (a ``bmm``), so one ordinary batched forward/backward gives every sample's own
gradient. Since the summed loss couples no two samples, this is numerically the per-sample
procedure (``label_masks_loop`` runs it one sample at a time; a test compares the two). The frozen
blocks before the first edited block run once per meta-batch.

Scale-out: under ``torchrun`` each rank makes its own pseudo-samples and the hypernetwork is wrapped
in DistributedDataParallel (gloo on CPU, nccl on CUDA), so all ranks hold identical weights.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from .errors import InputDataError, UsageError
from .models import LoadedModel, Site, forward_prefix, make_suffix, patch_grid, replace_site_layer

if TYPE_CHECKING:
    import torch
    from torch import nn


PSEUDO_KINDS = ("cutmix", "shift", "mix")


@dataclass(frozen=True)
class MetaTrainConfig:
    steps: int = 2000                 # meta-batches
    batch: int = 8                    # pseudo-samples per meta-batch (per process)
    inner_steps: int = 5
    outer_steps: int = 10
    inner_lr: float = 1e-3
    outer_lr: float = 0.1
    sparsity_weight: float = 1.0      # lambda on mean(m)
    locality_weight: float = 0.0      # weight of the KL on another clean image (0: the paper's objective)
    generalization_weight: float = 0.0  # weight of the KL on a same-class image given the same corruption (0: paper)
    temperature: float = 5.0
    mask_sharpness: float = 10.0      # m = sigmoid(10 z) while optimizing
    label_sharpness: float = 3.0      # label mask = sigmoid(3 z)
    hypernet_lr: float = 1e-4
    hypernet_steps: int = 2           # optimizer steps on each meta-batch
    hypernet_depth: int = 3
    box_min: float = 3 / 14           # CutMix box side, as a fraction of the patch grid side
    box_max: float = 8 / 14
    pseudo: str = "cutmix"            # pseudo-failures: cutmix (the paper), shift (whole-image warp + contrast), mix
    prior_weight: float = 0.0         # scores minus this times the mean score over clean images (0: the paper)
    prior_images: int = 2000          # clean images the mean score is taken over
    checkpoint_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "inner_steps", "outer_steps", "hypernet_steps", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.locality_weight < 0:
            raise UsageError("--locality-weight must be >= 0")
        if self.generalization_weight < 0:
            raise UsageError("--generalization-weight must be >= 0")
        if not 0 <= self.prior_weight <= 1:
            raise UsageError("--prior-weight must be between 0 and 1")
        if self.prior_images < 1:
            raise UsageError("--prior-images must be at least 1")
        if self.locality_weight > 0 and self.batch < 2:
            raise UsageError("--locality-weight needs --batch >= 2: each pseudo-sample is checked on another's image")
        if self.pseudo not in PSEUDO_KINDS:
            raise UsageError(f"--pseudo must be one of {', '.join(PSEUDO_KINDS)}")
        if not 0 < self.box_min <= self.box_max <= 1:
            raise UsageError("CutMix box fractions must satisfy 0 < box_min <= box_max <= 1")

    def to_json(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- batched weights


def _make_per_sample_linear(linear: "nn.Linear") -> "nn.Module":
    """A drop-in for ``linear`` whose weight is a per-sample tensor (B, out, in) set before each call."""
    from torch import nn

    class PerSampleLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.bias = linear.bias  # frozen, shared
            self.batched_weight: "torch.Tensor | None" = None

        def forward(self, x: "torch.Tensor") -> "torch.Tensor":
            # (B, N, in) @ (B, in, out) -> (B, N, out)
            y = x.bmm(self.batched_weight.transpose(1, 2))
            return y if self.bias is None else y + self.bias

    return PerSampleLinear()


class BatchedEditor:
    """A private copy of the model whose edited matrices hold one set of weights per sample."""

    def __init__(self, model: "nn.Module", sites: Sequence[Site]) -> None:
        self.sites = tuple(sites)
        self.start = min(s.block for s in sites)
        self.model = copy.deepcopy(model)
        self.layers = {}
        for s in self.sites:
            self.layers[s.param] = replace_site_layer(self.model, s, _make_per_sample_linear)
        self.base = {s.param: model.get_parameter(s.param).detach() for s in self.sites}
        self.suffix = make_suffix(self.model, self.start)

    def logits(self, tokens: "torch.Tensor", weights: dict[str, "torch.Tensor"]) -> "torch.Tensor":
        for p, w in weights.items():
            self.layers[p].batched_weight = w
        try:
            return self.suffix(tokens)
        finally:
            for p in weights:
                self.layers[p].batched_weight = None

    def expand_base(self, b: int) -> dict[str, "torch.Tensor"]:
        return {p: w.unsqueeze(0).expand(b, *w.shape).clone() for p, w in self.base.items()}


def _unit_view(site: Site, m: "torch.Tensor") -> "torch.Tensor":
    """(B, units) mask -> broadcastable over the (B, out, in) weight: fc1 rows, fc2 columns."""
    return m[:, :, None] if site.dim == 0 else m[:, None, :]


def kl_per_sample(logits: "torch.Tensor", target_probs: "torch.Tensor", temperature: float) -> "torch.Tensor":
    """T^2 KL(target || softmax(logits / T)) per sample: (B, C), (B, C) -> (B,)."""
    import torch

    logq = torch.log_softmax(logits / temperature, dim=-1)
    logp = torch.log(target_probs.clamp_min(1e-12))
    return temperature ** 2 * (target_probs * (logp - logq)).sum(-1)


def label_masks(editor: BatchedEditor, tokens: "torch.Tensor", target: "torch.Tensor", z_init: dict[str, "torch.Tensor"],
                cfg: MetaTrainConfig, ref: tuple["torch.Tensor", "torch.Tensor"] | None = None,
                pair: tuple["torch.Tensor", "torch.Tensor"] | None = None,
                ) -> tuple[dict[str, "torch.Tensor"], dict]:
    """Bi-level optimization of per-sample mask logits, all samples at once.

    tokens (B, N, D) at the first edited block of the *mixed* images; target (B, C) clean soft
    predictions; z_init per site (B, units). Returns per site (B, units) label masks in (0, 1).

    With ``cfg.locality_weight > 0``, ``ref = (ref_tokens, ref_target)`` gives each sample an unrelated
    clean image (tokens (B, N, D) and the unedited model's soft prediction (B, C)); the outer loss
    adds ``locality_weight * KL`` of that image under the sample's edited weights, so the label
    masks prefer units whose edit leaves other images alone.

    With ``cfg.generalization_weight > 0``, ``pair = (pair_tokens, pair_target)`` gives each sample a
    partner: another image of the same predicted class with the same corruption (tokens of the
    corrupted partner, the unedited model's soft prediction on the clean one). The pseudo-edit is
    still made on the sample alone; the outer loss adds ``generalization_weight * KL`` on the partner,
    so the label masks prefer units whose edit carries over to other images of the same shift.
    """
    import torch

    # Extra outer-loss terms: the KL each sample's pseudo-edit causes on other images, weighted.
    extra = [("locality_weight", ref, "reference"), ("generalization_weight", pair, "partner")]
    for name, images, what in extra:
        if getattr(cfg, name) > 0 and images is None:
            raise ValueError(f"{name} > 0 needs {what} images")
    extra = [(getattr(cfg, name), images) for name, images, _ in extra if getattr(cfg, name) > 0]
    z = {p: t.clone().requires_grad_(True) for p, t in z_init.items()}
    opt = torch.optim.RMSprop(list(z.values()), lr=cfg.outer_lr)
    w0 = editor.expand_base(tokens.shape[0])
    site_of = {s.param: s for s in editor.sites}

    def kl_grads(w: dict) -> list:
        wr = {p: v.detach().requires_grad_(True) for p, v in w.items()}
        kl = kl_per_sample(editor.logits(tokens, wr), target, cfg.temperature).sum()
        return list(torch.autograd.grad(kl, list(wr.values())))

    # The first inner step starts from w0 whatever the mask is: its gradient is computed once.
    g0 = dict(zip(w0, kl_grads(w0)))
    kl_after = None
    for _ in range(cfg.outer_steps):
        m = {p: torch.sigmoid(cfg.mask_sharpness * zz) for p, zz in z.items()}
        md = {p: _unit_view(site_of[p], v.detach()) for p, v in m.items()}
        g_sum = {p: g.clone() for p, g in g0.items()}
        w = {p: torch.addcmul(w0[p], md[p], g0[p], value=-cfg.inner_lr) for p in w0}
        for _ in range(cfg.inner_steps - 1):  # soft-masked SGD from the pretrained weights
            for p, g in zip(w, kl_grads(w)):
                w[p] = torch.addcmul(w[p], md[p], g, value=-cfg.inner_lr)
                g_sum[p].add_(g)
        # First order: the inner gradients are constants; w_inner depends on m only through the mask.
        w_inner = {p: w0[p] - cfg.inner_lr * _unit_view(site_of[p], m[p]) * g_sum[p] for p in w0}
        kl_s = kl_per_sample(editor.logits(tokens, w_inner), target, cfg.temperature)  # (B,)
        density = torch.cat([v for v in m.values()], dim=1).mean(1)  # (B,)
        loss = (kl_s + cfg.sparsity_weight * density).sum()
        for weight, (other_tokens, other_target) in extra:
            loss = loss + weight * kl_per_sample(editor.logits(other_tokens, w_inner), other_target,
                                                 cfg.temperature).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        kl_after = kl_s.detach()
    masks = {p: torch.sigmoid(cfg.label_sharpness * zz.detach()) for p, zz in z.items()}
    return masks, {"kl_after": kl_after}


def label_masks_loop(editor: BatchedEditor, tokens, target, z_init, cfg: MetaTrainConfig, ref=None, pair=None):
    """The same procedure one sample at a time (reference for tests and the speed benchmark)."""
    import torch

    def row(t, i):
        return None if t is None else (t[0][i:i + 1], t[1][i:i + 1])

    parts = [label_masks(editor, tokens[i:i + 1], target[i:i + 1], {p: t[i:i + 1] for p, t in z_init.items()}, cfg,
                         row(ref, i), row(pair, i))
             for i in range(tokens.shape[0])]
    masks = {p: torch.cat([m[p] for m, _ in parts]) for p in z_init}
    return masks, {"kl_after": torch.cat([info["kl_after"] for _, info in parts])}


# ----------------------------------------------------------------------------- CutMix


def draw_boxes(b: int, grid, box_min: float, box_max: float, gen: "torch.Generator") -> list[tuple[int, int, int, int]]:
    """One patch-aligned box per sample: (top, left, height, width) in patches, sides drawn on the grid."""
    import torch

    (gh, gw) = grid
    boxes = []
    for _ in range(b):
        sides = []
        for g in (gh, gw):
            lo = max(1, round(box_min * g))
            hi = max(lo, min(g, round(box_max * g)))
            sides.append(int(torch.randint(lo, hi + 1, (1,), generator=gen)))
        bh, bw = sides
        y = int(torch.randint(0, gh - bh + 1, (1,), generator=gen))
        x = int(torch.randint(0, gw - bw + 1, (1,), generator=gen))
        boxes.append((y, x, bh, bw))
    return boxes


def paste_boxes(base: "torch.Tensor", donor: "torch.Tensor", boxes, patch) -> "torch.Tensor":
    """``base`` with each sample's box (in patches) replaced by the same region of ``donor``."""
    out = base.clone()
    ph, pw = patch
    for i, (y, x, bh, bw) in enumerate(boxes):
        ys, xs = slice(y * ph, (y + bh) * ph), slice(x * pw, (x + bw) * pw)
        out[i, :, ys, xs] = donor[i, :, ys, xs]
    return out


def cutmix(base: "torch.Tensor", donor: "torch.Tensor", grid, patch, box_min: float, box_max: float,
           gen: "torch.Generator") -> "torch.Tensor":
    """Paste a patch-aligned box of ``donor`` into ``base``: (B, C, H, W) each -> (B, C, H, W)."""
    return paste_boxes(base, donor, draw_boxes(base.shape[0], grid, box_min, box_max, gen), patch)


def draw_shift(b: int, gen: "torch.Generator", max_rotation: float = 15.0, scale: tuple[float, float] = (0.75, 1.3),
               max_shear: float = 0.25, max_shift: float = 0.1, contrast: tuple[float, float] = (0.6, 1.4),
               max_brightness: float = 0.3) -> dict[str, "torch.Tensor"]:
    """Random whole-image shift parameters per sample: an affine ``theta`` (B, 2, 3) mapping output to
    input coordinates (rotation, anisotropic scale, shear, translation), ``contrast`` and ``brightness`` (B,)."""
    import torch

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(b, generator=gen)

    rot = torch.deg2rad(u(-max_rotation, max_rotation))
    sx = torch.exp(u(math.log(scale[0]), math.log(scale[1])))
    sy = torch.exp(u(math.log(scale[0]), math.log(scale[1])))
    shear = u(-max_shear, max_shear)
    tx, ty = u(-max_shift, max_shift), u(-max_shift, max_shift)
    c, s = torch.cos(rot), torch.sin(rot)
    # rotate, shear, then undo the scale (content grows by sx, sy)
    a11, a12 = c / sx, (c * shear - s) / sy
    a21, a22 = s / sx, (s * shear + c) / sy
    theta = torch.stack([torch.stack([a11, a12, tx], 1), torch.stack([a21, a22, ty], 1)], 1)
    return {"theta": theta, "contrast": u(*contrast), "brightness": u(-max_brightness, max_brightness)}


def apply_shift(x: "torch.Tensor", params: dict[str, "torch.Tensor"]) -> "torch.Tensor":
    """Warp each image by its ``theta``, then scale its contrast about its mean and move its brightness by
    ``brightness`` of its standard deviation. Works on preprocessed tensors of any channels, size, normalization."""
    import torch.nn.functional as F

    grid = F.affine_grid(params["theta"].to(x), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    std = out.std(dim=(1, 2, 3), keepdim=True)
    k = params["contrast"].to(x)[:, None, None, None]
    return mean + k * (out - mean) + params["brightness"].to(x)[:, None, None, None] * std


def global_shift(base: "torch.Tensor", gen: "torch.Generator", **ranges) -> "torch.Tensor":
    """A whole-image shift of each image: a random affine warp (rotation, anisotropic scale, shear,
    translation) and a contrast/brightness change, (B, C, H, W) -> (B, C, H, W); ``ranges`` as ``draw_shift``.

    A pseudo-failure of another kind than CutMix's pasted box: the object keeps its identity but its
    shape and tone move, as in a subpopulation the model rarely saw (wider, darker, tilted...).
    """
    return apply_shift(base, draw_shift(base.shape[0], gen, **ranges))


def pseudo_failures(kind: str, clean: "torch.Tensor", donor: "torch.Tensor", grid, patch, cfg: "MetaTrainConfig",
                    gen: "torch.Generator") -> tuple["torch.Tensor", Callable[["torch.Tensor"], "torch.Tensor"]]:
    """Pseudo-failures for one meta-batch: CutMix boxes, whole-image shifts, or each sample one of the two.

    Returns the corrupted images and a function that gives other images (B, C, H, W) *the same*
    corruption, sample by sample (the same donor box, or the same warp and tone change).
    """
    import torch

    boxes = params = pick = None
    if kind in ("cutmix", "mix"):
        boxes = draw_boxes(clean.shape[0], grid, cfg.box_min, cfg.box_max, gen)
    if kind in ("shift", "mix"):
        params = draw_shift(clean.shape[0], gen)
    if kind == "mix":
        pick = (torch.rand(clean.shape[0], generator=gen) < 0.5).to(clean.device)[:, None, None, None]

    def corrupt(x: "torch.Tensor") -> "torch.Tensor":
        if kind == "cutmix":
            return paste_boxes(x, donor, boxes, patch)
        if kind == "shift":
            return apply_shift(x, params)
        return torch.where(pick, apply_shift(x, params), paste_boxes(x, donor, boxes, patch))

    return corrupt(clean), corrupt


# ----------------------------------------------------------------------------- the loop


PARTNER_CANDIDATES = 4  # images drawn per sample to find a partner of the same predicted class


def pick_partners(classes: "torch.Tensor", cand_classes: "torch.Tensor") -> "torch.Tensor":
    """For each sample, the first candidate of its class, taking each candidate at most once; a sample
    with none left gets the first unused candidate. (B,), (M,) class indices -> (B,) candidate indices."""
    import torch

    cand = cand_classes.cpu()
    used = torch.zeros(len(cand), dtype=torch.bool)
    out = []
    for c in classes.tolist():
        same = ((cand == c) & ~used).nonzero().flatten()
        j = int(same[0]) if len(same) else int((~used).nonzero().flatten()[0])
        used[j] = True
        out.append(j)
    return torch.tensor(out, dtype=torch.long, device=cand_classes.device)


class ImagePool:
    """Training images: preloaded when small, else opened per batch. Bad files are skipped and counted."""

    def __init__(self, root: Path, loaded: LoadedModel, preload_limit: int = 20000,
                 progress: Callable[[str, int, int], None] | None = None) -> None:
        from .data import load_tensors, scan_unlabeled

        self.refs = scan_unlabeled(Path(root))
        self.loaded = loaded
        self.skipped = 0
        self.images = None
        if len(self.refs) <= preload_limit:
            self.images, self.refs, bad = load_tensors(
                self.refs, loaded.transform, loaded.channels, skip_bad=True,
                progress=(lambda d, t: progress("loading images", d, t)) if progress else None)
            self.skipped = len(bad)
        if len(self.refs) < 2:
            raise InputDataError(f"--data {root} has fewer than 2 usable images; meta-training needs a folder of "
                                 "in-distribution images (any number of sub-folders)")

    def __len__(self) -> int:
        return len(self.refs)

    def sample(self, n: int, gen: "torch.Generator") -> "torch.Tensor":
        import torch

        from .data import BadImageError, open_image

        idx = torch.randint(0, len(self.refs), (n,), generator=gen)
        if self.images is not None:
            return self.images[idx]
        out = []
        for i in idx.tolist():
            try:
                out.append(self.loaded.transform(open_image(self.refs[i].path, self.loaded.channels)))
            except BadImageError:
                self.skipped += 1
                out.append(self.sample(1, gen)[0])
        return torch.stack(out)


def _dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def meta_train(loaded: LoadedModel, sites: Sequence[Site], data: Path, cfg: MetaTrainConfig, out: Path, *,
               resume: bool = False, device: str = "cpu",
               progress: Callable[[str, int, int, dict], None] | None = None) -> dict:
    """Meta-train a hypernetwork for ``loaded`` on the images under ``data``; write ``out/hypernet.*``."""
    import torch

    rank, world = _dist_info()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    editor = BatchedEditor(loaded.model, sites)
    pool = ImagePool(data, loaded, progress=(lambda d_, n, t: progress(d_, n, t, {})) if progress and rank == 0 else None)
    run = _start_run(loaded, sites, data, cfg, out, rank, world, device, pool)
    if resume and run.checkpoint.exists():
        run.restore()
    elapsed0 = float(run.history[-1]["elapsed"]) if run.history else 0.0
    t0 = time.time()
    summary = {}
    while run.step < cfg.steps:
        batch = _pseudo_batch(run)
        masks, info = label_masks(editor, batch.tokens, batch.target, batch.z_init, cfg, batch.ref, batch.pair)
        label = torch.cat([masks[s.param] for s in sites], dim=1)                     # (B, units total)
        bce = _fit_hypernet(run, batch.feats, label)
        run.step += 1
        stats = _step_stats(run.step, batch.kl_before, info, label, bce, cfg, elapsed0 + time.time() - t0)
        run.history.append(stats)
        if progress and rank == 0:
            progress("meta-training", run.step, cfg.steps, stats)
        if run.step % cfg.checkpoint_every == 0 or run.step == cfg.steps:
            run.save_checkpoint()
            summary = run.write_artifact()
    if not summary:  # resumed a run that had already finished
        summary = run.write_artifact()
    return {**summary, "hypernet": str(out / "hypernet.safetensors"), "rank": rank}


@dataclass
class _MetaRun:
    """One meta-training run: what it trains for (model, sites, images, config), the hypernetwork with
    its optimizer, schedule and sample generator, and the step and history a checkpoint holds."""

    loaded: LoadedModel
    sites: Sequence[Site]
    data: Path
    cfg: MetaTrainConfig
    out: Path
    rank: int
    world: int
    device: str
    pool: ImagePool
    net: "nn.Module"
    train_net: "nn.Module"       # ``net``, or ``net`` in DistributedDataParallel
    opt: "torch.optim.Optimizer"
    sched: "torch.optim.lr_scheduler.LRScheduler"
    gen: "torch.Generator"
    start: int                   # the first edited block
    suffix: "nn.Module"          # the frozen model from ``start`` on
    step: int = 0
    history: list = field(default_factory=list)

    @property
    def checkpoint(self) -> Path:
        return self.out / f"checkpoint-rank{self.rank}.pt"

    def restore(self) -> None:
        """Continue from this rank's checkpoint."""
        import torch

        from .hypernet import with_zero_prior

        state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        self.net.load_state_dict(with_zero_prior(self.net, state["hypernet"]))
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.gen.set_state(state["generator"])
        self.step = int(state["step"])
        self.history = [dict(zip(state["history_keys"], row)) for row in state["history"].tolist()]

    def save_checkpoint(self) -> None:
        import torch

        from .artifacts import atomic_path

        keys = list(self.history[0].keys()) if self.history else []
        rows = torch.tensor([[h[k] for k in keys] for h in self.history], dtype=torch.float64)
        with atomic_path(self.checkpoint) as tmp:
            torch.save({"hypernet": self.net.state_dict(), "optimizer": self.opt.state_dict(),
                        "scheduler": self.sched.state_dict(), "generator": self.gen.get_state(), "step": self.step,
                        "history": rows, "history_keys": keys}, tmp)

    def write_artifact(self) -> dict:
        """The hypernetwork as of now (rank 0 writes it), so a run stopped early still leaves one."""
        from .artifacts import write_json
        from .hypernet import save_hypernet

        cfg, sites, model = self.cfg, self.sites, self.loaded.model
        summary = _summary(self.history, self.step, self.world, self.pool)
        if cfg.prior_weight > 0 and self.step == cfg.steps:  # the finished network's mean score on clean images
            self.net.prior.copy_(mean_scores(self.net, model, self.suffix, self.start, self.pool, cfg.prior_images,
                                             cfg.seed, self.device))
        if self.rank == 0:
            extra = {"sites": [s.to_json() for s in sites], "blocks": sorted({s.block for s in sites}),
                     "widths": {s.param: s.units for s in sites}, "meta_train_config": cfg.to_json(), **summary,
                     "data": str(self.data)}
            save_hypernet(self.out / "hypernet.safetensors", self.net, self.loaded.identity, extra)
            keys = list(self.history[0].keys())
            write_json(self.out / "history.json", {"keys": keys, "rows": [[h[k] for k in keys] for h in self.history]})
        return summary


def _start_run(loaded: LoadedModel, sites: Sequence[Site], data: Path, cfg: MetaTrainConfig, out: Path, rank: int,
               world: int, device: str, pool: ImagePool) -> _MetaRun:
    """A fresh hypernetwork (seeded: identical on every rank), its optimizer, cosine schedule and this
    rank's sample generator."""
    import torch

    from .hypernet import build_hypernet, hypernet_config_for

    torch.manual_seed(cfg.seed)  # identical hypernetwork init on every rank
    net = build_hypernet(hypernet_config_for(loaded.width, loaded.num_heads, sites, cfg.hypernet_depth,
                                             cfg.prior_weight)).to(device)
    train_net = net
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_net = DistributedDataParallel(net)
    opt = torch.optim.RMSprop(net.parameters(), lr=cfg.hypernet_lr)
    total_updates = cfg.steps * cfg.hypernet_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / total_updates))))
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    start = min(s.block for s in sites)
    return _MetaRun(loaded, sites, data, cfg, out, rank, world, device, pool, net, train_net, opt, sched, gen, start,
                    make_suffix(loaded.model, start))


@dataclass
class _PseudoBatch:
    """One meta-batch of pseudo-failures, as label_masks and the hypernetwork take it."""

    tokens: "torch.Tensor"      # (B, N, D) prefix tokens of the mixed images
    target: "torch.Tensor"      # (B, C) the frozen model's soft prediction on the clean images
    feats: "torch.Tensor"       # (B, D) [CLS] of the mixed images: the hypernetwork's input
    kl_before: "torch.Tensor"   # (B,) the mixed images' KL to the target before any edit
    z_init: dict
    ref: tuple | None           # locality term: each sample's unrelated image and its target
    pair: tuple | None          # generalization term: each sample's same-class partner, corrupted alike


def _pseudo_batch(run: _MetaRun) -> _PseudoBatch:
    """Draw one meta-batch with the run's generator (clean, donor, corruption, mask logits, partners:
    in that order, so a resumed run draws what an uninterrupted one would)."""
    import torch

    cfg, model, gen, device, start, base_suffix = run.cfg, run.loaded.model, run.gen, run.device, run.start, run.suffix
    grid, patch = patch_grid(model)
    clean = run.pool.sample(cfg.batch, gen).to(device)
    donor = run.pool.sample(cfg.batch, gen).to(device)
    mixed, corrupt = pseudo_failures(cfg.pseudo, clean, donor, grid, patch, cfg, gen)
    with torch.no_grad():
        target = torch.softmax(model(clean) / cfg.temperature, dim=-1)           # (B, C)
        tokens = forward_prefix(model, mixed, start)                              # (B, N, D), once per batch
        kl_before = kl_per_sample(base_suffix(tokens), target, cfg.temperature)
        feats = base_suffix(tokens, pre_logits=True)                              # (B, D) [CLS] of mixed
    z_init = {s.param: (torch.rand(cfg.batch, s.units, generator=gen) * 2 - 1).to(device) for s in run.sites}
    ref = None
    if cfg.locality_weight > 0:  # each sample's unrelated image: the next sample's clean image
        with torch.no_grad():
            ref = (forward_prefix(model, clean, start).roll(-1, 0), target.roll(-1, 0))
    pair = None
    if cfg.generalization_weight > 0:  # each sample's partner: a same-class image, corrupted the same way
        with torch.no_grad():
            cand = run.pool.sample(cfg.batch * PARTNER_CANDIDATES, gen).to(device)
            cand_pred = model(cand).argmax(-1)
            idx = pick_partners(target.argmax(-1), cand_pred)
            pair = (forward_prefix(model, corrupt(cand[idx]), start),
                    torch.softmax(model(cand[idx]) / cfg.temperature, dim=-1))
    return _PseudoBatch(tokens, target, feats, kl_before, z_init, ref, pair)


def _fit_hypernet(run: _MetaRun, feats: "torch.Tensor", label: "torch.Tensor") -> "torch.Tensor":
    """``hypernet_steps`` BCE steps of the hypernetwork toward the label masks; the last step's loss."""
    import torch
    import torch.nn.functional as F

    for _ in range(run.cfg.hypernet_steps):
        logits = torch.cat(run.train_net(feats, logits=True), dim=1)                 # (B, units total)
        bce = F.binary_cross_entropy_with_logits(logits, label)
        run.opt.zero_grad(set_to_none=True)
        bce.backward()
        run.opt.step()
        run.sched.step()
    return bce


def _step_stats(step: int, kl_before: "torch.Tensor", info: dict, label: "torch.Tensor", bce: "torch.Tensor",
                cfg: MetaTrainConfig, elapsed: float) -> dict:
    """One row of the history."""
    binary = (label > 0.5).float()
    return {
        "step": step,
        "kl_before": float(kl_before.mean()),
        "kl_after": float(info["kl_after"].mean()),
        "label_density": float(label.mean()),
        "label_binary_density": float(binary.mean()),
        "bce": float(bce.detach()),
        "diversity": float(binary.std(0).mean()) if cfg.batch > 1 else 0.0,
        "elapsed": elapsed,
    }


def mean_scores(net: "nn.Module", model: "nn.Module", suffix: "nn.Module", start: int, pool: ImagePool, n: int,
                seed: int, device: str, batch_size: int = 256) -> "torch.Tensor":
    """The hypernetwork's mean score of every unit over ``n`` clean images drawn from ``pool``: (units total,)."""
    import torch

    gen = torch.Generator().manual_seed(seed + 7919)  # its own stream: the training draws stay as they were
    total, count = None, 0
    with torch.no_grad():
        for lo in range(0, n, batch_size):
            x = pool.sample(min(batch_size, n - lo), gen).to(device)
            feats = suffix(forward_prefix(model, x, start), pre_logits=True)
            scores = torch.cat(net(feats, logits=True), dim=1).sigmoid()
            total = scores.sum(0) if total is None else total + scores.sum(0)
            count += len(x)
    return total / count


def _summary(history: list[dict], step: int, world: int, pool: "ImagePool") -> dict:
    last = history[-min(50, len(history)):]
    final = {k: sum(h[k] for h in last) / len(last) for k in ("kl_before", "kl_after", "label_density",
                                                                "label_binary_density", "bce", "diversity")}
    return {"steps": step, "world_size": world, "images": len(pool), "skipped_images": pool.skipped,
            "wall_seconds": round(history[-1]["elapsed"], 1) if history else 0.0,
            "final_mean_last_50": {k: round(v, 5) for k, v in final.items()}}



def run_meta_train(model_opts, data: Path, blocks: str | None, cfg: MetaTrainConfig, out: Path, resume: bool = False,
                   progress: Callable[[str, int, int, dict], None] | None = None) -> dict:
    """The ``vitedit meta-train`` job: load the model, join a torchrun group if launched by one, train."""
    import torch
    import torch.distributed as dist

    from .errors import WorkspaceError
    from .models import load_model, parse_blocks
    from .device import resolve_device

    out = Path(out)
    if (out / "hypernet.safetensors").exists() and not resume:
        raise WorkspaceError(f"{out / 'hypernet.safetensors'} already exists; pass --resume to continue that run or "
                             "choose another --out (nothing was overwritten)")
    device = resolve_device(model_opts.device)
    started_group = False
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
        started_group = True
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
    try:
        loaded = load_model(model_opts.name, weights=model_opts.weights, device=device)
        sites = loaded.sites(parse_blocks(blocks, loaded.depth))
        return meta_train(loaded, sites, data, cfg, out, resume=resume, device=device, progress=progress)
    finally:
        if started_group:
            dist.destroy_process_group()
