"""Peak memory of locate -> apply -> report on 5,000 failure images and a 10,000-image locality set.

Generates ``--failures`` small PNGs (``--size`` px, 4 class folders) and ``--locality`` PNGs in a
temporary folder, and a random-init timm ``test_vit`` saved as a weights file (5 classes: the 4
folders and a fifth, "other", whose head bias is raised by 5 so that the model gets every image
wrong and all of them are failures). Each step then runs in its own subprocess through
``vitedit.cli.main`` with ``OMP_NUM_THREADS=1``:

- ``floor``: import vitedit, torch and timm and load the model (what every step pays anyway);
- ``locate FAILURES --edit-images 10``;
- ``apply --max-steps 2 --locality DIR``;
- ``report --sparsities 0.05 --max-steps 1 --locality DIR``;
- with ``--streamed``, ``apply, streamed``: apply again with ``VITEDIT_CACHE_BUDGET_MB=0``, so no
  token set is cached and every measurement re-reads the images in batches (about 2 more minutes).

For each step: wall time and the child's peak RSS (``ru_maxrss`` of that child, from ``os.wait4``;
``getrusage(RUSAGE_CHILDREN)`` would give the running maximum over all children instead).

For comparison it prints what the all-in-memory approach (every image set as one tensor, every set's
prefix tokens cached, as vitedit did before) would hold: a computed estimate, images and tokens bytes
plus the per-image scores, added to the measured floor. The same estimate, and the bounded one
(token sets cached only under the budget, else one batch of images and tokens at a time), is
printed for a ViT-B/16 at 224 px (same set sizes), where no model is run.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_scale.py        # ~4 min, 1 thread
    .venv/bin/python benchmarks/bench_scale.py --failures 500 --locality 1000 --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLASSES = ["cat", "dog", "ship", "truck"]
LABELS = CLASSES + ["other"]
FLOAT = 4  # bytes per float32
MB = 1 << 20

STEP = """
import sys
from vitedit.cli import main
main(sys.argv[1:])
"""

FLOOR = """
import sys
from vitedit.models import load_model
load_model("test_vit", weights=sys.argv[1], labels_file=sys.argv[2], device="cpu")
"""


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--failures", type=int, default=5000, help="failure images (spread over 4 class folders)")
    ap.add_argument("--locality", type=int, default=10000, help="locality images")
    ap.add_argument("--size", type=int, default=32, help="side of the generated PNGs in pixels")
    ap.add_argument("--streamed", action="store_true",
                    help="also run apply with VITEDIT_CACHE_BUDGET_MB=0")
    ap.add_argument("--keep", type=Path, default=None, help="generate into this folder and keep it")
    ap.add_argument("--json", action="store_true", help="also print one JSON object (last line of stdout)")
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- inputs


def write_pngs(folder: Path, n: int, size: int, seed: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")


def make_inputs(root: Path, args) -> dict:
    import timm
    import torch
    from safetensors.torch import save_file

    failures, locality = root / "failures", root / "locality"
    for c, name in enumerate(CLASSES):
        n = args.failures // len(CLASSES) + (c < args.failures % len(CLASSES))
        write_pngs(failures / name, n, args.size, seed=c)
    write_pngs(locality, args.locality, args.size, seed=99)
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=len(LABELS))
    with torch.no_grad():
        model.head.bias[len(CLASSES)] += 5.0  # "other" wins: every image of the 4 folders is a failure
    weights = root / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    labels = root / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    cfg = timm.data.resolve_model_data_config(model)
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    units = sum(b.mlp.fc1.out_features for b in model.blocks[1:4]) * 2  # default sites: blocks 1-3, fc1 + fc2
    return {"failures": failures, "locality": locality, "weights": weights, "labels": labels,
            "shape": {"input": list(cfg["input_size"]), "tokens": tokens, "width": model.embed_dim, "units": units}}


# ----------------------------------------------------------------------------- running steps


def run_step(argv: list[str], env: dict, cwd: Path, code: str = STEP) -> dict:
    """Run ``code`` in a fresh interpreter; its wall time, peak RSS (MB) and stdout."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", code, *argv], env=env, cwd=cwd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"step {argv[:1]} failed ({proc.returncode}):\n{stderr[-2000:]}")
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
            "result": json.loads(stdout) if stdout.strip() else None}


# ----------------------------------------------------------------------------- estimates


def data_bytes(shape: dict, n_failures: int, n_locality: int, n_edit: int, budget: int, batch: int) -> dict:
    """Bytes of image and token data each approach holds at once (scores included in both)."""
    c, h, w = shape["input"]
    image = c * h * w * FLOAT
    token = shape["tokens"] * shape["width"] * FLOAT
    scores = n_failures * shape["units"] * FLOAT
    n_hold = n_failures - n_edit
    naive = {
        # all images as one tensor, plus the failing ones copied out, plus their prefix tokens
        "locate": 2 * n_failures * image + n_failures * token + scores,
        # every failure image (images.safetensors) and locality image, every set's tokens
        "apply/report": (n_failures + n_locality) * (image + token) + scores,
    }
    sets = [n_edit * token, n_hold * token, n_locality * token]
    kept = sum(t for t in sets if t <= budget)
    filling = max((min(t, budget) for t in sets if t > budget), default=0)  # dropped once over budget
    one_batch = batch * (image + token)
    bounded = {
        "locate": one_batch + scores,
        "apply/report": n_edit * image + kept + filling + one_batch + scores,
    }
    return {"image_bytes": image, "token_bytes": token, "naive": naive, "bounded": bounded}


def vit_b_shape() -> dict:
    # ViT-B/16 at 224 px: 196 patches + [CLS], width 768, MLP 3072; default sites: 3 blocks x fc1, fc2
    return {"input": [3, 224, 224], "tokens": 197, "width": 768, "units": 3 * 2 * 3072}


# ----------------------------------------------------------------------------- main


def main(argv=None) -> None:
    args = parse_args(argv)
    from vitedit.evaluate import DEFAULT_BATCH, DEFAULT_CACHE_BUDGET_MB

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("VITEDIT_CACHE_BUDGET_MB", None)
    ctx = tempfile.TemporaryDirectory(prefix="bench-scale-") if args.keep is None else None
    root = Path(ctx.name if ctx else args.keep)
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        inputs = make_inputs(root, args)
        gen_s = time.perf_counter() - t0
        model = ["--model", "test_vit", "--weights", str(inputs["weights"]), "--labels", str(inputs["labels"]),
                 "--device", "cpu"]
        loc = ["--locality", str(inputs["locality"])]
        steps = {"floor": run_step([str(inputs["weights"]), str(inputs["labels"])], env, root, FLOOR)}
        steps["locate"] = run_step(["locate", str(inputs["failures"]), *model, "--edit-images", "10", "--json"],
                                   env, root)
        steps["apply"] = run_step(["apply", "--max-steps", "2", *loc, "--device", "cpu", "--json"], env, root)
        steps["report"] = run_step(["report", "--sparsities", "0.05", "--max-steps", "1", *loc, "--device", "cpu",
                                    "--json"], env, root)
        if args.streamed:
            steps["apply, streamed"] = run_step(["apply", "--max-steps", "2", *loc, "--device", "cpu", "--json"],
                                                {**env, "VITEDIT_CACHE_BUDGET_MB": "0"}, root)
    finally:
        if ctx:
            ctx.cleanup()

    located, applied = steps["locate"]["result"], steps["apply"]["result"]
    n_fail, n_edit = located["failures"], located["edit_images"]
    budget = DEFAULT_CACHE_BUDGET_MB * MB
    tiny = data_bytes(inputs["shape"], n_fail, args.locality, n_edit, budget, DEFAULT_BATCH)
    vitb = data_bytes(vit_b_shape(), n_fail, args.locality, n_edit, budget, DEFAULT_BATCH)
    floor = steps["floor"]["peak_rss_mb"]

    print(f"{args.failures} failure PNGs ({len(CLASSES)} class folders) and {args.locality} locality PNGs, "
          f"{args.size}x{args.size}, generated in {gen_s:.0f} s; model test_vit, input "
          f"{'x'.join(map(str, inputs['shape']['input']))}, 1 thread, CPU")
    print(f"locate: {n_fail} failures ({located['already_correct']} already correct), {n_edit} edit / "
          f"{located['holdout_images']} held-out images; apply: {applied['locality_images']} locality images, "
          f"success {applied['success']}, generalization {applied['generalization']}, "
          f"locality {applied['locality']}")
    print(f"{'step':<17}{'wall s':>8}{'peak RSS MB':>13}{'all-in-memory estimate MB':>27}")
    for name, s in steps.items():
        key = "locate" if name == "locate" else "apply/report" if name != "floor" else None
        naive = f"{floor + tiny['naive'][key] / MB:,.0f}" if key else ""
        print(f"{name:<17}{s['wall_s']:>8.1f}{s['peak_rss_mb']:>13,.0f}{naive:>27}")
    print(f"  all-in-memory estimate = floor + image and token bytes held at once: an image is "
          f"{tiny['image_bytes'] / 1024:.0f} KB as a tensor, its tokens {tiny['token_bytes'] / 1024:.0f} KB")
    print(f"ViT-B/16 at 224 px, same set sizes (estimate of the data held, model and interpreter not included): "
          f"an image is {vitb['image_bytes'] / 1024:.0f} KB, its tokens {vitb['token_bytes'] / 1024:.0f} KB")
    for key in ("locate", "apply/report"):
        print(f"  {key:<13} all-in-memory {vitb['naive'][key] / MB:>8,.0f} MB   bounded (budget "
              f"{DEFAULT_CACHE_BUDGET_MB} MB, batch {DEFAULT_BATCH}) {vitb['bounded'][key] / MB:>7,.0f} MB")
    if args.json:
        print(json.dumps({"benchmark": "scale", "failures": args.failures, "locality": args.locality,
                          "size": args.size, "threads": 1, "generate_s": round(gen_s, 1),
                          "steps": {k: {"wall_s": v["wall_s"], "peak_rss_mb": v["peak_rss_mb"]}
                                    for k, v in steps.items()},
                          "estimate_mb": {"test_vit": {k: {a: round(b / MB) for a, b in tiny[k].items()}
                                                       for k in ("naive", "bounded")},
                                          "vit_b16_224": {k: {a: round(b / MB) for a, b in vitb[k].items()}
                                                          for k in ("naive", "bounded")}}}))


if __name__ == "__main__":
    main()
