"""The attempts behind the local editor's defaults, on the demo case, scored as a user would.

The demo case: the embedded default model, the bundled shirt group, the 10 edit images ``vitedit
locate --edit-images 10`` picks (seed 0), the other 161 held out; hypernetwork masks. Each attempt is
one edit (``vitedit.edit.edit`` with the attempt's ``EditConfig``), scored on:

- generalization: the 161 held-out shirts;
- accuracy drop (points) and flip rate on the in-distribution test pool (``--pool``: the 7,953 images
  of ``python -m vitedit.zoo.fashion test-images``; never used for fitting);
- the flip rate on the preserve set itself ("pflip"), to see whether the preservation term only
  holds the images it was fitted on.

    python -m vitedit.zoo.fashion test-images --work build/fashion
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/local_edit_attempts.py --pool build/fashion/test-images
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/local_edit_attempts.py --pool build/fashion/test-images --only plain,local
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# name -> (EditConfig fields, sparsity)
ATTEMPTS = {
    "plain": (dict(), 0.05),
    "margin stop 0.2": (dict(stop_margin=0.2), 0.05),
    "null-space 0.01": (dict(nullspace_threshold=0.01), 0.05),
    "null-space 0.1": (dict(nullspace_threshold=0.1), 0.05),
    "null-space 0.3": (dict(nullspace_threshold=0.3), 0.05),
    "KL 3": (dict(preserve_weight=3, preserve_batch=32, max_steps=200), 0.05),
    "KL 10": (dict(preserve_weight=10, preserve_batch=32, max_steps=200), 0.05),
    "KL 3 + null-space 0.1": (dict(preserve_weight=3, preserve_batch=32, nullspace_threshold=0.1, max_steps=200), 0.05),
    "KL 3 + margin stop 0.2 + null-space 0.01": (dict(preserve_weight=3, preserve_batch=32, nullspace_threshold=0.01,
                                                      stop_margin=0.2, max_steps=200), 0.05),
    "plain + augment": (dict(augment=1), 0.05),
    # the local editor before the fragile minibatch and the plateau rule
    "local (KL 3 + augment)": (dict(preserve_weight=3, preserve_batch=32, augment=1, max_steps=200, anchor_weight=3), 0.05),
    "local at sparsity 0.25": (dict(preserve_weight=3, preserve_batch=32, augment=1, max_steps=200, anchor_weight=3), 0.25),
    "default": (None, 0.05),  # the default editor's preset as it is now (edit.DEFAULT_OBJECTIVE)
    "KL 10 + augment, 300 steps, sparsity 0.25": (dict(preserve_weight=10, preserve_batch=32, augment=1, max_steps=300), 0.25),
    "hinge 3 + augment": (dict(preserve_weight=3, preserve_batch=32, augment=1, preserve_loss="margin", max_steps=200), 0.05),
    "KL 3 + augment + nearest 100": (dict(preserve_weight=3, preserve_batch=32, augment=1, preserve_nearest=100,
                                          max_steps=200), 0.05),
}
# the statistics penalty (vitedit.stats): weight x augment x stopping rule
for _w in (3, 10, 30, 100, 300, 1000, 3000):
    for _aug in (0, 1):
        for _stop in (None, 0.5):
            ATTEMPTS[f"stats {_w}" + (" + augment" if _aug else "") + (f" + margin stop {_stop}" if _stop else "")] = (
                dict(stats_weight=_w, augment=_aug, max_steps=200, stop_margin=_stop), 0.05)
# statistics + a small KL minibatch (from the whole set, or the most fragile preserve images)
for _w in (3, 10, 30):
    for _b in (8, 16):
        for _frag in (0, 200):
            ATTEMPTS[f"stats {_w} + KL 3 batch {_b}" + (f" fragile {_frag}" if _frag else "") + " + augment"] = (
                dict(stats_weight=_w, preserve_weight=3, preserve_batch=_b, preserve_fragile=_frag, augment=1,
                     max_steps=200), 0.05)
for _b in (8, 16, 32):
    ATTEMPTS[f"KL 3 batch {_b} fragile 200 + augment"] = (
        dict(preserve_weight=3, preserve_batch=_b, preserve_fragile=200, augment=1, max_steps=200), 0.05)
# the fragile minibatch: pool size, weight, steps, views
for _frag in (100, 200, 400):
    for _w in (3, 10):
        for _steps in (100, 150, 200):
            for _aug in (1, 2):
                ATTEMPTS[f"KL {_w} batch 8 fragile {_frag} + augment {_aug} x {_steps} steps"] = (
                    dict(preserve_weight=_w, preserve_batch=8, preserve_fragile=_frag, augment=_aug,
                         max_steps=_steps), 0.05)
# the plateau stopping rule
for _win in (10, 20, 40):
    ATTEMPTS[f"KL 3 batch 8 fragile 200 + augment 1 plateau {_win}"] = (
        dict(preserve_weight=3, preserve_batch=8, preserve_fragile=200, augment=1, max_steps=300, plateau=_win), 0.05)
# minibatch size and pool under the plateau rule
for _b in (8, 16, 32):
    for _frag in (200, 400):
        ATTEMPTS[f"KL 3 batch {_b} fragile {_frag} + augment 1 plateau 20"] = (
            dict(preserve_weight=3, preserve_batch=_b, preserve_fragile=_frag, augment=1, max_steps=300, plateau=20),
            0.05)
# half of the minibatch from the fragile images, half from the whole set
for _b in (8, 16):
    ATTEMPTS[f"KL 3 batch {_b} half fragile 200 + augment 1 plateau 20"] = (
        dict(preserve_weight=3, preserve_batch=_b, preserve_fragile=200, fragile_share=0.5, augment=1, max_steps=300,
             plateau=20), 0.05)
# the Kronecker-factored KL penalty (input moments x output-gradient moments): weight x augment
for _kind in ("fisher", "logits"):
    for _w in (0.1, 1, 10, 100, 1000, 10000):
        for _aug in (0, 1):
            ATTEMPTS[f"{_kind} {_w}" + (" + augment" if _aug else "")] = (
                dict(stats_weight=_w, augment=_aug, max_steps=200), 0.05)


def main(argv=None) -> None:
    import torch
    from torch.func import functional_call

    from vitedit.data import load_tensors, scan_labeled
    from vitedit.edit import DEFAULT_OBJECTIVE, EditConfig, edit, objective_config
    from vitedit.evaluate import TokenCache
    from vitedit.hypernet import load_hypernet
    from vitedit.masks import UnitScores
    from vitedit.models import DEFAULT_ASSETS, load_model
    from vitedit.pipeline import resolve_edit_config, split_rows
    from vitedit.preserve import build_preserve_set
    from vitedit.stats import compute_stats

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", type=Path, required=True, help="labeled in-distribution test images")
    ap.add_argument("--group", default="shirt")
    ap.add_argument("--only", help="comma-separated attempt names")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--mask", choices=("hypernet", "gradient"), default="hypernet", help="which locator's mask")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    loaded = load_model(None)
    model, sites = loaded.model, tuple(loaded.sites())
    start = min(s.block for s in sites)

    def load(refs):
        x, good, _ = load_tensors(refs, loaded.transform, loaded.channels)
        return x, torch.tensor([r.label for r in good])

    fx, fy = load(scan_labeled(DEFAULT_ASSETS / "failures" / args.group, loaded.labels))
    edit_rows, hold_rows = split_rows(len(fy), 0.3, 0, 10)  # what `locate --edit-images 10` picks
    px, py = load(scan_labeled(args.pool, loaded.labels))
    pool = TokenCache(model, start, px)
    pool_base = pool.predict()
    base_acc = float((pool_base == py).float().mean())
    hold = TokenCache(model, start, fx[hold_rows])
    prx, _ = load(scan_labeled(DEFAULT_ASSETS / "preserve", loaded.labels))
    preserve = build_preserve_set(model, sites, prx)
    t = time.time()
    stats = compute_stats(model, sites, prx.split(256), model_identity=loaded.identity, preserve_sha256="bundled",
                          fisher=False)
    print(f"preserve statistics: {stats.images} images, {stats.tokens} tokens, {time.time() - t:.1f}s", flush=True)
    t = time.time()
    by_kind = {"stats": stats}
    for kind in ("fisher", "logits"):
        if any(n.startswith(kind) for n in (args.only or kind).split(",")):
            t = time.time()
            by_kind[kind] = compute_stats(model, sites, prx.split(256), model_identity=loaded.identity,
                                          preserve_sha256="bundled", probe=kind)
            print(f"preserve statistics with {kind} gradients: {time.time() - t:.1f}s", flush=True)
    hypernet, _ = load_hypernet(DEFAULT_ASSETS / "hypernet.safetensors", loaded.identity, sites)
    edit_set = TokenCache(model, start, fx[edit_rows])
    with torch.no_grad():
        scores = hypernet(edit_set.suffix(edit_set.tokens, pre_logits=True))
    hyp = UnitScores(sites, {s.param: v.mean(0) for s, v in zip(sites, scores)}, "hypernet")
    if args.mask == "gradient":
        from vitedit.locate import aggregate, score_batches

        hyp = aggregate(score_batches("gradient", model, sites, [(fx[edit_rows], fy[edit_rows])]), sites, None,
                        "gradient")
    plain_lr = resolve_edit_config(loaded, {}, "plain").lr
    print(f"{loaded.name}, group {args.group}: {len(edit_rows)} edit images, {len(hold_rows)} held out; "
          f"pool {len(py)} images, base accuracy {base_acc:.4f}; preserve set {len(preserve)} images", flush=True)
    rows = []
    names = [n.strip() for n in args.only.split(",")] if args.only else list(ATTEMPTS)
    for name in names:
        if name not in ATTEMPTS:
            raise SystemExit(f"unknown attempt {name!r}")
        fields, sparsity = ATTEMPTS[name]
        cfg = objective_config(DEFAULT_OBJECTIVE, lr=plain_lr) if fields is None else EditConfig(lr=plain_lr, **fields)
        mask = hyp.select(sparsity)
        t = time.time()
        res = edit(model, mask, fx[edit_rows], fy[edit_rows], cfg, tokens=edit_set.tokens,
                   preserve=preserve if cfg.uses_preserve else None, stats=by_kind[name.split()[0]] if cfg.uses_stats else None)
        seconds = time.time() - t
        w = res.patch.weights(model)
        pred = pool.predict(w)
        with torch.inference_mode():
            pflip = float((functional_call(pool.suffix, w, (preserve.tokens,)).argmax(-1)
                           != preserve.base_log_probs.argmax(-1)).float().mean())
        row = {"attempt": name, "sparsity": sparsity, "success": res.edit_accuracy, "steps": res.steps,
               "generalization": float((hold.predict(w) == fy[hold_rows]).float().mean()),
               "accuracy_drop": round(100 * (base_acc - float((pred == py).float().mean())), 2),
               "flip_rate": float((pred != pool_base).float().mean()), "preserve_flip_rate": pflip,
               "seconds": round(seconds, 1)}
        rows.append(row)
        print(f"{name:<42} sparsity {sparsity:<4} success {row['success']:.2f} steps {res.steps:>3} "
              f"generalization {row['generalization']:.3f} drop {row['accuracy_drop']:5.2f} "
              f"flips {100 * row['flip_rate']:5.2f}% pflip {100 * pflip:5.2f}% ({seconds:.0f}s)", flush=True)
    if args.json:
        print(json.dumps({"base_accuracy": base_acc, "pool_images": len(py), "attempts": rows}))


if __name__ == "__main__":
    main()
