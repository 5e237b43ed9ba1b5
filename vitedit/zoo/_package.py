"""``package`` step of the Fashion-MNIST recipe: evaluate the trained model and write the shipped assets.

Assets (``vitedit/assets/fashion/``, a few MB, read-only at run time):
- ``model.safetensors`` + ``model.json``: weights; architecture, preprocessing, label names, the
  recipe's figures and provenance;
- ``labels.txt``;
- ``failures/<group>/<class folder>/<test index>.png``: per class, the withheld-cluster *test* images
  the model gets wrong (only groups with at least ``MIN_GROUP`` failures);
- ``sensitive/<class folder>/<test index>.png``: in-distribution test images classified correctly
  with a top-2 probability gap below 0.05 (``vitedit sensitive``'s rule): the default locality set;
- ``test/<class folder>/<test index>.png``: a seeded sample of in-distribution test images, for the
  benchmark's "drop in overall accuracy";
- ``preserve/<class folder>/train-<train index>.png``: a seeded sample of in-distribution
  *training* images, the default preserve set (images an edit is trained to leave alone; never used
  for measurement, and disjoint from every test image by construction);
- ``split.json``: the withheld train/test indices per group and the seed.

It also writes (not shipped) ``<work>/metatrain/<class folder>/<train index>.png``: in-distribution
training images for ``vitedit meta-train``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

MIN_GROUP = 10
TEST_SAMPLE = 1000
PRESERVE_IMAGES = 2000
METATRAIN_IMAGES = 12000


def group_name(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")


def _write_png(path: Path, img: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img, mode="L").save(path, optimize=True)


def in_distribution_test(data: dict, manifest: dict) -> np.ndarray:
    """Indices of the test images outside every withheld group."""
    withheld = np.zeros(len(data["test_y"]), dtype=bool)
    for g in manifest["groups"]:
        withheld[g["test_indices"]] = True
    return np.flatnonzero(~withheld)


def write_test_images(data: dict, manifest: dict, out: Path, everything: bool = False) -> int:
    """Every in-distribution test image (``everything``: all 10,000, withheld groups included) as
    ``out/<class folder>/<test index>.png``; replaces ``out``."""
    from vitedit.data import safe_label_name

    from .fashion import LABELS

    idx = np.arange(len(data["test_y"])) if everything else in_distribution_test(data, manifest)
    if out.exists():
        shutil.rmtree(out)
    for i in idx:
        _write_png(out / safe_label_name(LABELS[int(data["test_y"][i])]) / f"{i:05d}.png", data["test_x"][i])
    return len(idx)


def write_preserve(data: dict, manifest: dict, out: Path, n: int = PRESERVE_IMAGES, seed: int = 0) -> int:
    """A seeded sample of ``n`` in-distribution training images as ``out/<class folder>/train-<index>.png``.

    Training images outside every withheld group: what the model saw, so an edit that keeps them
    keeps the model's ordinary behaviour. Replaces ``out``. Its own random stream (``seed``, "preserve"),
    so the other assets do not change when it is rewritten.
    """
    import zlib

    from vitedit.data import safe_label_name

    from .fashion import LABELS

    withheld = np.zeros(len(data["train_y"]), dtype=bool)
    for g in manifest["groups"]:
        withheld[g["train_indices"]] = True
    keep = np.flatnonzero(~withheld)
    rng = np.random.default_rng([seed, zlib.crc32(b"preserve")])
    idx = np.sort(rng.choice(keep, size=min(n, len(keep)), replace=False))
    if out.exists():
        shutil.rmtree(out)
    for i in idx:
        _write_png(out / safe_label_name(LABELS[int(data["train_y"][i])]) / f"train-{i:05d}.png", data["train_x"][i])
    return len(idx)


def package(data: dict, manifest: dict, work: Path, assets: Path, args) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    from vitedit.data import safe_label_name
    from vitedit.evaluate import sensitive_mask

    from .fashion import ARCHITECTURE, LABELS, MEAN, MODEL_KWARGS, STD, create_model, to_input

    t0 = time.time()
    model = create_model()
    model.load_state_dict(load_file(str(work / "model.safetensors")))
    model.eval()
    x_test = to_input(data["test_x"])
    y_test = torch.from_numpy(data["test_y"].astype(np.int64))
    with torch.inference_mode():
        logits = torch.cat([model(x_test[i:i + 1000]) for i in range(0, len(x_test), 1000)])
    pred = logits.argmax(-1)

    in_dist = in_distribution_test(data, manifest)
    in_acc = float((pred[in_dist] == y_test[in_dist]).float().mean())

    if assets.exists():
        shutil.rmtree(assets)
    assets.mkdir(parents=True)
    folders = [safe_label_name(lbl) for lbl in LABELS]

    groups = []
    for g in manifest["groups"]:
        idx = np.array(g["test_indices"])
        wrong = idx[(pred[idx] != y_test[idx]).numpy()]
        acc = 1.0 - len(wrong) / max(1, len(idx))
        entry = {"group": group_name(g["class_name"]), "class_index": g["class_index"], "class_name": g["class_name"],
                 "withheld_test_images": int(len(idx)), "accuracy": round(acc, 4), "failures": int(len(wrong)),
                 "shipped": len(wrong) >= MIN_GROUP}
        if entry["shipped"]:
            for i in wrong:
                _write_png(assets / "failures" / entry["group"] / folders[g["class_index"]] / f"{i:05d}.png",
                           data["test_x"][i])
        groups.append(entry)

    sens = sensitive_mask(logits[in_dist], y_test[in_dist], margin=0.05).numpy()
    sens_idx = in_dist[sens]
    for i in sens_idx:
        _write_png(assets / "sensitive" / folders[int(y_test[i])] / f"{i:05d}.png", data["test_x"][i])

    rng = np.random.default_rng(args.seed)
    test_idx = np.sort(rng.choice(in_dist, size=min(TEST_SAMPLE, len(in_dist)), replace=False))
    for i in test_idx:
        _write_png(assets / "test" / folders[int(y_test[i])] / f"{i:05d}.png", data["test_x"][i])

    train_withheld = np.zeros(len(data["train_y"]), dtype=bool)
    for g in manifest["groups"]:
        train_withheld[g["train_indices"]] = True
    keep = np.flatnonzero(~train_withheld)
    meta_idx = np.sort(rng.choice(keep, size=min(METATRAIN_IMAGES, len(keep)), replace=False))
    meta_dir = work / "metatrain"
    if meta_dir.exists():
        shutil.rmtree(meta_dir)
    for i in meta_idx:
        _write_png(meta_dir / folders[int(data["train_y"][i])] / f"{i:05d}.png", data["train_x"][i])

    n_preserve = write_preserve(data, manifest, assets / "preserve", seed=args.seed)

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(assets / "model.safetensors"))
    (assets / "labels.txt").write_text("\n".join(LABELS) + "\n")
    (assets / "split.json").write_text(json.dumps(manifest, separators=(",", ":")))
    figures = {
        "in_distribution_test_accuracy": round(in_acc, 4),
        "in_distribution_test_images": int(len(in_dist)),
        "groups": groups,
        "groups_with_40_or_more_failures": sum(1 for g in groups if g["failures"] >= 40),
        "sensitive_images": int(len(sens_idx)),
        "test_sample_images": int(len(test_idx)),
        "preserve_images": n_preserve,
    }
    train_log = (work / "train.log").read_text() if (work / "train.log").exists() else ""
    meta = {
        "name": "vitedit/fashion-vit",
        "architecture": ARCHITECTURE,
        "model_kwargs": MODEL_KWARGS,
        "data_config": {"input_size": [MODEL_KWARGS["in_chans"], MODEL_KWARGS["img_size"], MODEL_KWARGS["img_size"]],
                        "mean": list(MEAN), "std": list(STD), "interpolation": "bilinear", "crop_pct": 1.0,
                        "crop_mode": "center"},
        "labels": list(LABELS),
        "label_folders": folders,
        "edit_defaults": {"lr": args.edit_lr},
        "figures": figures,
        "recipe": {"command": (f"python -m vitedit.zoo.fashion build --work {work} --epochs {args.epochs}"
                               + (f" --restart-epochs {','.join(map(str, args.restart_epochs))} --restart-lr {args.restart_lr}"
                                  if args.restart_epochs else "") + f" --edit-lr {args.edit_lr} --resume"),
                   "restart_epochs": args.restart_epochs,
                   "seed": args.seed, "epochs": args.epochs, "batch": args.batch, "lr": args.lr,
                   "clusters": args.clusters, "min_share": args.min_share,
                   "last_epoch_line": next((ln for ln in reversed(train_log.splitlines()) if ln.startswith(("epoch", "restart"))), None)},
        "data": "Fashion-MNIST (MIT licence), Debian package dataset-fashion-mnist",
    }
    (assets / "model.json").write_text(json.dumps(meta, indent=2) + "\n")

    print(f"in-distribution test accuracy {in_acc:.4f} on {len(in_dist)} images")
    for g in groups:
        print(f"group {g['group']:<12} withheld test {g['withheld_test_images']:>4}  accuracy {g['accuracy']:.3f}  "
              f"failures {g['failures']:>4}{'' if g['shipped'] else '  (not shipped)'}")
    print(f"groups with >= 40 failures: {figures['groups_with_40_or_more_failures']}; "
          f"sensitive set {len(sens_idx)} images; test sample {len(test_idx)}; "
          f"meta-train images {len(meta_idx)} in {meta_dir}; packaged in {time.time() - t0:.0f}s")
    return figures
