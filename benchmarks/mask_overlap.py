"""How much do the locators agree, and do masks of one failure group overlap more than across groups?

For every bundled failure group of the default model, the first ``--images`` failures are scored
per image by the hypernetwork (``--hypernet``, default: the shipped one), the gradient locator and
the bilevel oracle (``vitedit.locate``). Each image's mask is its top ``--sparsity`` units. Printed:

- for each pair of locators, the mean Jaccard overlap of the two masks of the same image;
- for each locator, the mean overlap of two images' masks from the same group and from different
  groups (the paper reports more overlap within a group for learned masks);
- the overlap two random masks of that size would have on average, k / (2n - k), for scale.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mask_overlap.py
    .venv/bin/python benchmarks/mask_overlap.py --hypernet build/hypernet-D/hypernet.safetensors --json
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path


def top_sets(scores: dict, sites, k: int) -> list[frozenset]:
    """Per image: the set of global unit indices of its top-k scores."""
    import torch

    flat = torch.cat([scores[s.param] for s in sites], dim=1)  # (N, units)
    return [frozenset(row.topk(k).indices.tolist()) for row in flat]


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=12, help="failures per group")
    p.add_argument("--sparsity", type=float, default=0.05)
    p.add_argument("--hypernet", type=Path, default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    import torch

    from vitedit.data import load_tensors, scan_labeled
    from vitedit.demo import examples
    from vitedit.hypernet import load_hypernet
    from vitedit.locate import LocateInputs, bilevel_locator, gradient_locator, hypernet_locator
    from vitedit.masks import units_for
    from vitedit.models import load_model
    from vitedit.pipeline import default_hypernet_for

    loaded = load_model(None)
    sites = tuple(loaded.sites())
    net, _ = load_hypernet(args.hypernet or default_hypernet_for(loaded), loaded.identity, sites)
    n_units = sum(s.units for s in sites)
    k = units_for(args.sparsity, n_units)
    locators = {"hypernet": hypernet_locator, "gradient": gradient_locator, "bilevel": bilevel_locator}
    masks: dict[str, list[tuple[str, frozenset]]] = {name: [] for name in locators}
    for g in examples():
        refs = scan_labeled(Path(g["path"]), loaded.labels)[: args.images]
        x, good, _ = load_tensors(refs, loaded.transform, loaded.channels)
        y = torch.tensor([r.label for r in good])
        for name, fn in locators.items():
            scores = fn(LocateInputs(loaded.model, sites, x, y, seed=0, hypernet=net))
            masks[name] += [(g["group"], m) for m in top_sets(scores, sites, k)]

    same_image = {f"{a} vs {b}": sum(jaccard(ma, mb) for (_, ma), (_, mb) in zip(masks[a], masks[b])) / len(masks[a])
                  for a, b in itertools.combinations(locators, 2)}
    groups = {}
    for name, ms in masks.items():
        within, across = [], []
        for (ga, a), (gb, b) in itertools.combinations(ms, 2):
            (within if ga == gb else across).append(jaccard(a, b))
        groups[name] = {"within_group": sum(within) / len(within), "across_groups": sum(across) / len(across)}
    result = {"sparsity": args.sparsity, "units": k, "of": n_units, "images": len(masks["hypernet"]),
              "random_expectation": k / (2 * n_units - k), "same_image": same_image, "groups": groups}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"masks of {k} of {n_units} units (sparsity {args.sparsity}) on {result['images']} failures; "
          f"two random masks overlap {result['random_expectation']:.3f} on average (Jaccard)")
    for pair, v in same_image.items():
        print(f"same image, {pair}: {v:.3f}")
    for name, v in groups.items():
        print(f"{name}: two images of the same group {v['within_group']:.3f}, of different groups {v['across_groups']:.3f}")


if __name__ == "__main__":
    main()
