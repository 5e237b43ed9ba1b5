"""How many units the bundled groups' hypernetwork masks share on the base model.

Each group's mask is chosen as `vitedit-lab stack` chooses it for a single edit (the same
seeded 10 edit images, the hypernetwork's scores averaged over them, global top-k at the sparsity).
Prints, per pair of groups, the units both masks hold: what a later edit overwrites of an earlier one
when the masks are not kept disjoint (`--disjoint`).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mask_overlap.py [--sparsity 0.05] [--edit-images 10]
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.05)
    ap.add_argument("--edit-images", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    from vitedit.data import load_tensors, scan_labeled
    from vitedit.demo import examples
    from vitedit.hypernet import load_hypernet
    from vitedit.masks import UnitScores
    from vitedit.models import forward_prefix, load_model, make_suffix
    from vitedit.pipeline import default_hypernet_for
    from vitedit.lab.sequential import _seed

    base = load_model(None)
    sites = tuple(base.sites())
    start = min(s.block for s in sites)
    hypernet, _ = load_hypernet(default_hypernet_for(base), base.identity, sites)
    masks: dict[str, set] = {}
    for g in examples():
        x, good, _ = load_tensors(scan_labeled(Path(g["path"]), base.labels), base.transform, base.channels)
        if len(good) <= args.edit_images:
            continue
        perm = torch.randperm(len(good), generator=torch.Generator().manual_seed(_seed(args.seed, g["group"])))
        rows = perm[:args.edit_images].sort().values
        with torch.no_grad():
            feats = make_suffix(base.model, start)(forward_prefix(base.model, x[rows], start), pre_logits=True)
            scores = hypernet(feats)
        mask = UnitScores(sites, {s.param: v.mean(0) for s, v in zip(sites, scores)}, "hypernet").select(args.sparsity)
        masks[g["group"]] = {(p, int(i)) for p, ix in mask.indices.items() for i in ix}
    k = len(next(iter(masks.values())))
    total = sum(s.units for s in sites)
    print(f"sparsity {args.sparsity:g}: {k} of {total} units per mask, {len(masks)} groups")
    print("| group | group | shared units | share of a mask |")
    print("|---|---|---|---|")
    shares = []
    for a, b in itertools.combinations(sorted(masks), 2):
        n = len(masks[a] & masks[b])
        shares.append(n / k)
        print(f"| {a} | {b} | {n} | {n / k:.0%} |")
    union = set().union(*masks.values())
    print(f"mean share {sum(shares) / len(shares):.0%}; the union of all masks holds {len(union)} units "
          f"({len(union) / total:.1%} of all)")


if __name__ == "__main__":
    main()
