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
from typing import Callable, Sequence

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
    return _outside_groups(len(data["test_y"]), manifest, "test_indices")


def in_distribution_train(data: dict, manifest: dict) -> np.ndarray:
    """Indices of the training images outside every withheld group."""
    return _outside_groups(len(data["train_y"]), manifest, "train_indices")


def _outside_groups(n: int, manifest: dict, key: str) -> np.ndarray:
    withheld = np.zeros(n, dtype=bool)
    for g in manifest["groups"]:
        withheld[g[key]] = True
    return np.flatnonzero(~withheld)


def write_class_images(out: Path, indices, images: np.ndarray, labels, prefix: str = "") -> None:
    """``images[i]`` as ``out/<class folder of labels[i]>/<prefix><i:05d>.png`` for each i in ``indices``."""
    from vitedit.data import safe_label_name

    from .fashion import LABELS

    folders = [safe_label_name(lbl) for lbl in LABELS]
    for i in indices:
        _write_png(out / folders[int(labels[i])] / f"{prefix}{i:05d}.png", images[i])


def failure_groups(manifest: dict, failed_of: Callable[[np.ndarray], Sequence[int]], test_x: np.ndarray, out: Path,
                   flag: str, min_group: int = MIN_GROUP) -> list[dict]:
    """Per withheld group, its figures; the test images of groups with at least ``min_group`` failures
    (``failed_of(group test indices)``) are written to ``out/failures/<group>/<class folder>/``, and
    ``flag`` says which groups were."""
    from vitedit.data import safe_label_name

    from .fashion import LABELS

    groups = []
    for g in manifest["groups"]:
        idx = np.asarray(g["test_indices"])
        failed = failed_of(idx)
        entry = {"group": group_name(g["class_name"]), "class_index": g["class_index"], "class_name": g["class_name"],
                 "withheld_test_images": int(len(idx)), "accuracy": round(1.0 - len(failed) / max(1, len(idx)), 4),
                 "failures": int(len(failed)), flag: len(failed) >= min_group}
        if entry[flag]:
            folder = out / "failures" / entry["group"] / safe_label_name(LABELS[g["class_index"]])
            for i in failed:
                _write_png(folder / f"{i:05d}.png", test_x[i])
        groups.append(entry)
    return groups


def write_test_images(data: dict, manifest: dict, out: Path, everything: bool = False) -> int:
    """Every in-distribution test image (``everything``: all 10,000, withheld groups included) as
    ``out/<class folder>/<test index>.png``; replaces ``out``."""
    idx = np.arange(len(data["test_y"])) if everything else in_distribution_test(data, manifest)
    if out.exists():
        shutil.rmtree(out)
    write_class_images(out, idx, data["test_x"], data["test_y"])
    return len(idx)


def write_preserve(data: dict, manifest: dict, out: Path, n: int = PRESERVE_IMAGES, seed: int = 0) -> int:
    """A seeded sample of ``n`` in-distribution training images as ``out/<class folder>/train-<index>.png``.

    Training images outside every withheld group: what the model saw, so an edit that keeps them
    keeps the model's ordinary behaviour. Replaces ``out``. Its own random stream (``seed``, "preserve"),
    so the other assets do not change when it is rewritten.
    """
    import zlib

    keep = in_distribution_train(data, manifest)
    rng = np.random.default_rng([seed, zlib.crc32(b"preserve")])
    idx = np.sort(rng.choice(keep, size=min(n, len(keep)), replace=False))
    if out.exists():
        shutil.rmtree(out)
    write_class_images(out, idx, data["train_x"], data["train_y"], prefix="train-")
    return len(idx)


def package(data: dict, manifest: dict, work: Path, assets: Path, args) -> dict:
    """Evaluate ``work/model.safetensors`` on the test set and write the assets (module docstring)."""
    import torch

    from vitedit.evaluate import sensitive_mask

    t0 = time.time()
    model, logits = _test_logits(work, data)
    y_test = torch.from_numpy(data["test_y"].astype(np.int64))
    pred = logits.argmax(-1)
    in_dist = in_distribution_test(data, manifest)
    in_acc = float((pred[in_dist] == y_test[in_dist]).float().mean())

    if assets.exists():
        shutil.rmtree(assets)
    assets.mkdir(parents=True)
    groups = failure_groups(manifest, lambda idx: idx[(pred[idx] != y_test[idx]).numpy()], data["test_x"], assets,
                            "shipped")
    sens_idx = in_dist[sensitive_mask(logits[in_dist], y_test[in_dist], margin=0.05).numpy()]
    write_class_images(assets / "sensitive", sens_idx, data["test_x"], y_test)
    rng = np.random.default_rng(args.seed)  # the test sample, then the meta-training images
    test_idx = np.sort(rng.choice(in_dist, size=min(TEST_SAMPLE, len(in_dist)), replace=False))
    write_class_images(assets / "test", test_idx, data["test_x"], y_test)
    meta_idx = _write_metatrain(data, manifest, work / "metatrain", rng)
    n_preserve = write_preserve(data, manifest, assets / "preserve", seed=args.seed)
    _save_model(model, manifest, assets)
    figures = {
        "in_distribution_test_accuracy": round(in_acc, 4),
        "in_distribution_test_images": int(len(in_dist)),
        "groups": groups,
        "groups_with_40_or_more_failures": sum(1 for g in groups if g["failures"] >= 40),
        "sensitive_images": int(len(sens_idx)),
        "test_sample_images": int(len(test_idx)),
        "preserve_images": n_preserve,
    }
    (assets / "model.json").write_text(json.dumps(_model_json(work, args, figures), indent=2) + "\n")

    print(f"in-distribution test accuracy {in_acc:.4f} on {len(in_dist)} images")
    for g in groups:
        print(f"group {g['group']:<12} withheld test {g['withheld_test_images']:>4}  accuracy {g['accuracy']:.3f}  "
              f"failures {g['failures']:>4}{'' if g['shipped'] else '  (not shipped)'}")
    print(f"groups with >= 40 failures: {figures['groups_with_40_or_more_failures']}; "
          f"sensitive set {len(sens_idx)} images; test sample {len(test_idx)}; "
          f"meta-train images {len(meta_idx)} in {work / 'metatrain'}; packaged in {time.time() - t0:.0f}s")
    return figures


def _test_logits(work: Path, data: dict):
    """The trained model (``work/model.safetensors``) and its logits on every test image: (10000, classes)."""
    import torch
    from safetensors.torch import load_file

    from .fashion import create_model, to_input

    model = create_model()
    model.load_state_dict(load_file(str(work / "model.safetensors")))
    model.eval()
    x_test = to_input(data["test_x"])
    with torch.inference_mode():
        logits = torch.cat([model(x_test[i:i + 1000]) for i in range(0, len(x_test), 1000)])
    return model, logits


def _write_metatrain(data: dict, manifest: dict, out: Path, rng) -> np.ndarray:
    """A seeded sample of in-distribution training images for ``vitedit meta-train``; replaces ``out``."""
    keep = in_distribution_train(data, manifest)
    meta_idx = np.sort(rng.choice(keep, size=min(METATRAIN_IMAGES, len(keep)), replace=False))
    if out.exists():
        shutil.rmtree(out)
    write_class_images(out, meta_idx, data["train_x"], data["train_y"])
    return meta_idx


def _save_model(model, manifest: dict, assets: Path) -> None:
    """Weights, label names and the split."""
    from safetensors.torch import save_file

    from .fashion import LABELS

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(assets / "model.safetensors"))
    (assets / "labels.txt").write_text("\n".join(LABELS) + "\n")
    (assets / "split.json").write_text(json.dumps(manifest, separators=(",", ":")))


def _model_json(work: Path, args, figures: dict) -> dict:
    """``model.json``: architecture, preprocessing, labels, edit defaults, figures and the recipe."""
    from vitedit.data import safe_label_name

    from .fashion import ARCHITECTURE, LABELS, MEAN, MODEL_KWARGS, STD

    train_log = (work / "train.log").read_text() if (work / "train.log").exists() else ""
    return {
        "name": "vitedit/fashion-vit",
        "architecture": ARCHITECTURE,
        "model_kwargs": MODEL_KWARGS,
        "data_config": {"input_size": [MODEL_KWARGS["in_chans"], MODEL_KWARGS["img_size"], MODEL_KWARGS["img_size"]],
                        "mean": list(MEAN), "std": list(STD), "interpolation": "bilinear", "crop_pct": 1.0,
                        "crop_mode": "center"},
        "labels": list(LABELS),
        "label_folders": [safe_label_name(lbl) for lbl in LABELS],
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
