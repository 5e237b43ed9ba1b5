"""A probe of a different kind of edit, not a vitedit feature: single edits routed by a gate.

Each bundled group's single local edit (from the base model, as the sequential benchmark's single
arm: the same 10 seeded edit images, 5% hypernetwork mask) applies to an input only when the input's
base pre-logit feature lies within the group's radius of one of its 10 edit images (cosine
distance); the radius is the q-quantile of the bundled preserve images' distances to those edit
images (unlabeled training images, so fitting the radius on them is legitimate). Otherwise the base
model answers. Prints, per q, the in-distribution (7,953) and all-test (10,000) accuracy, the share of
inputs routed to an edit, and per group the held-out generalization of the single edit and of the
gated one. It asks whether a nearest-edit-image gate (the idea behind codebook / side-memory editors)
could keep a stack of edits both local and apart. Needs the zoo's test-image folders:

    python -m vitedit.zoo.fashion test-images --work build/fashion
    python -m vitedit.zoo.fashion all-test-images --work build/fashion
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gated_probe.py [Q ...]     # default 0.005 0.01 0.02 0.05
"""
import sys
import time
from pathlib import Path

import torch
from torch.func import functional_call

from vitedit.data import load_tensors, scan_labeled, scan_unlabeled
from vitedit.demo import examples
from vitedit.edit import edit
from vitedit.hypernet import load_hypernet
from vitedit.masks import UnitScores
from vitedit.models import forward_prefix, load_model, make_suffix
from vitedit.pipeline import default_hypernet_for, default_preserve_dir, resolve_edit_config
from vitedit.preserve import build_preserve_set
from vitedit.lab.sequential import _seed

t0 = time.time()
base = load_model(None)
sites = tuple(base.sites())
start = min(s.block for s in sites)
hyper, _ = load_hypernet(default_hypernet_for(base), base.identity, sites)
suffix = make_suffix(base.model, start)
cfg = resolve_edit_config(base, {}, "local")


def load(refs):
    x, good, _ = load_tensors(refs, base.transform, base.channels)
    y = torch.tensor([r.label for r in good]) if good and good[0].label is not None else None
    return x, y


def tok(x):
    with torch.inference_mode():
        return torch.cat([forward_prefix(base.model, c, start) for c in x.split(512)])


def run(t, weights=None):
    """(logits, features) of prefix tokens t under weights."""
    with torch.inference_mode():
        lo, fe = [], []
        for c in t.split(512):
            if weights:
                lo.append(functional_call(suffix, weights, (c,)))
            else:
                lo.append(suffix(c))
                fe.append(suffix(c, pre_logits=True))
        return torch.cat(lo), (torch.cat(fe) if fe else None)


px = load(scan_unlabeled(default_preserve_dir(base)))[0]
preserve = build_preserve_set(base.model, sites, px)
p_tok = tok(px)
_, p_feat = run(p_tok)
tx, ty = load(scan_labeled(Path("build/fashion/test-images"), base.labels))
ax, ay = load(scan_labeled(Path("build/fashion/all-test-images"), base.labels))
t_tok, a_tok = tok(tx), tok(ax)
t_log, t_feat = run(t_tok)
a_log, a_feat = run(a_tok)
print("loaded", round(time.time() - t0), "s", flush=True)

groups = []
for g in examples():
    x, y = load(scan_labeled(Path(g["path"]), base.labels))
    if len(y) <= 10:
        continue
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(_seed(0, g["group"])))
    e, h = perm[:10].sort().values, perm[10:].sort().values
    et = tok(x[e])
    with torch.no_grad():
        sc = hyper(suffix(et, pre_logits=True))
    mask = UnitScores(sites, {s.param: v.mean(0) for s, v in zip(sites, sc)}, "hypernet").select(0.05)
    res = edit(base.model, mask, x[e], y[e], cfg, tokens=et, preserve=preserve, seed=_seed(0, g["group"], "single"))
    w = res.patch.weights(base.model)
    ht = tok(x[h])
    _, e_feat = run(et)
    _, h_feat = run(ht)
    groups.append({"group": g["group"], "w": w, "e_feat": e_feat, "h_tok": ht, "h_feat": h_feat, "y_h": y[h]})
    print("edited", g["group"], round(time.time() - t0), "s", flush=True)


def dist(feat, ref):
    a = torch.nn.functional.normalize(feat, dim=-1)
    b = torch.nn.functional.normalize(ref, dim=-1)
    return 1 - (a @ b.T).max(-1).values


def routed(tokens, feat, base_logits, radii):
    d = torch.stack([dist(feat, g["e_feat"]) / r for g, r in zip(groups, radii)], 1)  # (N, G)
    best = d.argmin(1)
    on = d.min(1).values < 1
    pred = base_logits.argmax(-1).clone()
    for k, g in enumerate(groups):
        rows = (on & (best == k)).nonzero().flatten()
        if len(rows):
            pred[rows] = run(tokens[rows], g["w"])[0].argmax(-1)
    return pred, on


for q in [float(a) for a in (sys.argv[1:] or ["0.005", "0.01", "0.02", "0.05"])]:
    radii = [torch.quantile(dist(p_feat, g["e_feat"]), q) for g in groups]
    out = []
    for g in groups:
        single = (run(g["h_tok"], g["w"])[0].argmax(-1) == g["y_h"]).float().mean().item()
        pred, on = routed(g["h_tok"], g["h_feat"], run(g["h_tok"])[0], radii)
        gated = (pred == g["y_h"]).float().mean().item()
        out.append((g["group"], single, gated, on.float().mean().item()))
    tp, ton = routed(t_tok, t_feat, t_log, radii)
    ap, aon = routed(a_tok, a_feat, a_log, radii)
    base_t = (t_log.argmax(-1) == ty).float().mean().item()
    base_a = (a_log.argmax(-1) == ay).float().mean().item()
    ret = [gt / s for _, s, gt, _ in out]
    print(f"q={q}: in-dist {base_t:.4f} -> {(tp == ty).float().mean():.4f} (routed {ton.float().mean():.3f}, "
          f"flips {(tp != t_log.argmax(-1)).float().mean():.4f}); 10k {base_a:.4f} -> {(ap == ay).float().mean():.4f}; "
          f"retained mean {sum(ret) / len(ret):.3f} worst {min(ret):.3f}", flush=True)
    for name, s, gt, r in out:
        print(f"   {name:12s} single {s:.3f} gated {gt:.3f} routed {r:.3f}")
