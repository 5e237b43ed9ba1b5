"""How strongly does the pseudo-edit of meta-training move the model? (choosing inner_lr and lambda)

On CutMix pseudo-failures built from the embedded default's bundled in-distribution test sample, it
prints:
1. the KL to the clean target before editing, and after ``--inner-steps`` soft-masked SGD steps
   with a *full* mask, for several inner learning rates (the paper's 1e-3 was tuned for ViT-B/16);
2. for several (inner_lr, lambda) pairs, the label masks that the bi-level optimization produces:
   KL after the edit, mean and binarized density, diversity across the batch (mean per-unit std
   of the binarized masks) and the overlap of two samples' masks.

    python benchmarks/tune_metatrain.py [--batch 8] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--inner-steps", type=int, default=3)
    p.add_argument("--outer-steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from vitedit.data import load_tensors, scan_labeled
    from vitedit.metatrain import BatchedEditor, MetaTrainConfig, cutmix, kl_per_sample, label_masks, patch_grid
    from vitedit.models import DEFAULT_ASSETS, forward_prefix, load_model, make_suffix

    torch.set_num_threads(args.threads)
    loaded = load_model(None)
    model, sites = loaded.model, loaded.sites()
    start = min(s.block for s in sites)
    x, _, _ = load_tensors(scan_labeled(DEFAULT_ASSETS / "test", loaded.labels), loaded.transform, loaded.channels)
    g = torch.Generator().manual_seed(args.seed)
    b = args.batch
    clean, donor = x[torch.randint(0, len(x), (b,), generator=g)], x[torch.randint(0, len(x), (b,), generator=g)]
    grid, patch = patch_grid(model)
    mixed = cutmix(clean, donor, grid, patch, 3 / 14, 8 / 14, g)
    editor = BatchedEditor(model, sites)
    with torch.no_grad():
        target = torch.softmax(model(clean) / 5.0, -1)
        tokens = forward_prefix(model, mixed, start)
        before = kl_per_sample(make_suffix(model, start)(tokens), target, 5.0)
    print(f"{loaded.name}, batch {b}, seed {args.seed}, {args.threads} thread(s)")
    print(f"KL before editing: {before.mean():.4f}")
    print(f"1. full mask, {args.inner_steps} inner steps:")
    for lr in (1e-3, 1e-2, 1e-1, 5e-1, 1.0):
        w = editor.expand_base(b)
        for _ in range(args.inner_steps):
            wr = {k: v.requires_grad_(True) for k, v in w.items()}
            grads = torch.autograd.grad(kl_per_sample(editor.logits(tokens, wr), target, 5.0).sum(), list(wr.values()))
            w = {k: (wr[k] - lr * gr).detach() for k, gr in zip(wr, grads)}
        with torch.no_grad():
            after = kl_per_sample(editor.logits(tokens, w), target, 5.0)
        print(f"   inner_lr {lr:<6g} KL after {after.mean():.4f}")
    print(f"2. bi-level label masks ({args.outer_steps} outer x {args.inner_steps} inner steps):")
    for inner_lr, lam in ((1e-3, 1.0), (0.1, 1.0), (0.1, 0.1), (0.5, 0.3), (1.0, 1.0)):
        cfg = MetaTrainConfig(inner_lr=inner_lr, sparsity_weight=lam, outer_steps=args.outer_steps,
                              inner_steps=args.inner_steps)
        gz = torch.Generator().manual_seed(args.seed + 1)
        z = {s.param: torch.rand(b, s.units, generator=gz) * 2 - 1 for s in sites}
        t0 = time.time()
        masks, info = label_masks(editor, tokens, target, z, cfg)
        lab = torch.cat([masks[s.param] for s in sites], 1)
        binary = (lab > 0.5).float()
        overlap = float((binary[0] * binary[1]).sum() / binary[0].sum().clamp_min(1))
        print(f"   inner_lr {inner_lr:<6g} lambda {lam:<4g} KL after {info['kl_after'].mean():.4f}  density "
              f"{lab.mean():.4f}  binary {binary.mean():.4f}  diversity {binary.std(0).mean():.4f}  "
              f"overlap(0,1) {overlap:.2f}  ({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    main()
