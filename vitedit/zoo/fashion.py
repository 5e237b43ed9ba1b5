"""Recipe for vitedit's embedded default: a small ViT trained from scratch on Fashion-MNIST.

It reproduces the paper's setting (a classifier failing on subpopulations it rarely saw) at CPU
scale, with real data (see docs/default-model.md):

1. ``split``: inside every class, k-means (on PCA features of the pixels) finds ``--clusters``
   subpopulations; one per class is *withheld* from training by a fixed rule (the cluster farthest
   from the class mean among those holding at least ``--min-share`` of the class). The manifest
   names every withheld train and test index.
2. ``train``: a timm ViT is trained on the remaining training images, with a checkpoint after every
   epoch and ``--resume`` from the last one.
3. ``package``: the trained model is evaluated (in-distribution test accuracy, accuracy per withheld
   group) and the package assets are written: weights (safetensors + JSON provenance), label names,
   failure groups (withheld *test* images the model gets wrong) as PNG folders, the sensitive
   locality set, and the split manifest.

``build`` runs all three. Usage::

    python -m vitedit.zoo.fashion build --work build/fashion --resume

``preserve`` (also part of ``package``) rewrites only the shipped preserve set
(``vitedit/assets/fashion/preserve/``), leaving every other asset as it is.

``test-images`` (not part of ``build``) writes every in-distribution test image to
``<work>/test-images/<class folder>/<test index>.png``: a pool for larger locality sets
(``vitedit sensitive build/fashion/test-images -o DIR --margin M``) and the 7,953-image check set
an edit is scored on; ``all-test-images`` writes all 10,000 test images (withheld groups included)
to ``<work>/all-test-images/``.

The Fashion-MNIST files come from the Debian package ``dataset-fashion-mnist``; the shipped
package never needs them at run time.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import shutil
import struct
import sys
import time
from pathlib import Path

import numpy as np

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
          "Ankle boot")
# timm architecture of the default model and its overrides (a 6-block ViT on a 7x7 patch grid).
ARCHITECTURE = "vit_tiny_patch16_224"
MODEL_KWARGS = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=128, depth=6,
                    num_heads=4)
# Preprocessing the model was trained with: pixels / 255, then (x - mean) / std.
MEAN, STD = (0.2860,), (0.3530,)


# ----------------------------------------------------------------------------- data

def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file as a uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    _, dtype, ndim = struct.unpack(">HBB", data[:4])
    if dtype != 0x08:
        raise ValueError(f"{path}: unsupported IDX dtype {dtype:#x}")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion(data_dir: Path = DATA_DIR) -> dict[str, np.ndarray]:
    files = {"train_x": "train-images-idx3-ubyte.gz", "train_y": "train-labels-idx1-ubyte.gz",
             "test_x": "t10k-images-idx3-ubyte.gz", "test_y": "t10k-labels-idx1-ubyte.gz"}
    missing = [n for n in files.values() if not (data_dir / n).exists()]
    if missing:
        sys.exit(f"error: {', '.join(missing)} not found in {data_dir}; install them with "
                 "`apt-get install dataset-fashion-mnist` or pass --data-dir")
    return {k: read_idx(data_dir / n) for k, n in files.items()}


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 50) -> np.ndarray:
    """Plain Lloyd k-means with k-means++ seeding; returns the (k, d) centroids."""
    centers = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d2 = np.min(((x[:, None, :] - np.stack(centers)[None]) ** 2).sum(-1), axis=1)
        centers.append(x[rng.choice(len(x), p=d2 / d2.sum())])
    c = np.stack(centers)
    for _ in range(iters):
        assign = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
        new = np.stack([x[assign == j].mean(0) if np.any(assign == j) else c[j] for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    return c


def make_split(data: dict[str, np.ndarray], clusters: int, min_share: float, seed: int) -> dict:
    """Withhold one k-means subpopulation per class; return the manifest (all indices explicit)."""
    rng = np.random.default_rng(seed)
    groups = []
    for cls in range(len(LABELS)):
        tr_idx = np.flatnonzero(data["train_y"] == cls)
        te_idx = np.flatnonzero(data["test_y"] == cls)
        xtr = data["train_x"][tr_idx].reshape(len(tr_idx), -1).astype(np.float64) / 255.0
        xte = data["test_x"][te_idx].reshape(len(te_idx), -1).astype(np.float64) / 255.0
        mean = xtr.mean(0)
        # PCA(32) fitted on the class's training images.
        _, _, vt = np.linalg.svd(xtr - mean, full_matrices=False)
        proj = vt[:32].T
        ftr, fte = (xtr - mean) @ proj, (xte - mean) @ proj
        c = kmeans(ftr, clusters, rng)
        atr = np.argmin(((ftr[:, None] - c[None]) ** 2).sum(-1), axis=1)
        ate = np.argmin(((fte[:, None] - c[None]) ** 2).sum(-1), axis=1)
        shares = np.bincount(atr, minlength=clusters) / len(tr_idx)
        dist = np.linalg.norm(c, axis=1)  # distance of each centroid from the class mean (origin)
        eligible = [j for j in range(clusters) if shares[j] >= min_share]
        chosen = max(eligible, key=lambda j: dist[j])
        groups.append({
            "class_index": cls, "class_name": LABELS[cls], "cluster": int(chosen),
            "cluster_share": float(shares[chosen]), "centroid_distance": float(dist[chosen]),
            "train_indices": tr_idx[atr == chosen].tolist(),
            "test_indices": te_idx[ate == chosen].tolist(),
        })
    return {"seed": seed, "clusters_per_class": clusters, "min_share": min_share,
            "features": "PCA(32) of pixels/255, fitted per class on training images",
            "rule": "withhold the cluster whose centroid is farthest from the class mean among "
                    "clusters holding >= min_share of the class's training images",
            "groups": groups}


# ----------------------------------------------------------------------------- training

def create_model(**extra):
    import timm
    return timm.create_model(ARCHITECTURE, pretrained=False, **MODEL_KWARGS, **extra)


def to_input(x_uint8: np.ndarray):
    import torch
    x = torch.from_numpy(np.ascontiguousarray(x_uint8)).float().div_(255.0).unsqueeze(1)
    return (x - MEAN[0]) / STD[0]


def augment(x, gen):
    """Random 2-pixel translation (zero padding in pixel space) and horizontal flip."""
    import torch
    import torch.nn.functional as F
    b = x.shape[0]
    pad_value = -MEAN[0] / STD[0]  # a black pixel after normalization
    xp = F.pad(x, (2, 2, 2, 2), value=pad_value)
    ox = torch.randint(0, 5, (b,), generator=gen)
    oy = torch.randint(0, 5, (b,), generator=gen)
    out = torch.stack([xp[i, :, oy[i]:oy[i] + 28, ox[i]:ox[i] + 28] for i in range(b)])
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def stage_names(cycles: int) -> list[str]:
    """Stage names in order: "" (training from scratch), then "restart", "restart2", ... ."""
    return [""] + ["restart" + (str(i + 1) if i else "") for i in range(cycles)]


def stage_weights(work: Path, stage: str) -> Path:
    """Where a stage's final weights are kept (``model.safetensors`` is always the latest stage's)."""
    return work / f"model-{stage or 'stage1'}.safetensors"


def train(data, manifest, work: Path, epochs: int, batch: int, lr: float, seed: int, resume: bool,
          threads: int, stage: str = "", init: str | None = None) -> None:
    """Train from scratch (stage "") or run a further cosine cycle without warm-up (stage "restart",
    "restart2", ...) starting from the final weights of stage ``init``."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from vitedit.artifacts import atomic_path

    torch.set_num_threads(threads)
    withheld = np.zeros(len(data["train_y"]), dtype=bool)
    for g in manifest["groups"]:
        withheld[g["train_indices"]] = True
    keep = np.flatnonzero(~withheld)
    x_all, y_all = to_input(data["train_x"][keep]), torch.from_numpy(data["train_y"][keep].astype(np.int64))
    print(f"training on {len(keep)} images ({withheld.sum()} withheld)", flush=True)

    torch.manual_seed(seed)
    model = create_model(drop_path_rate=0.1)
    if init is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(stage_weights(work, init))))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(keep) / batch)
    total, warmup = max(1, epochs * steps_per_epoch), (1 if stage else steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    gen = torch.Generator().manual_seed(seed)
    start = 0
    ckpt = work / f"checkpoint{'-' + stage if stage else ''}.pt"
    if resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        start = int(state["epoch"])
        print(f"resumed after epoch {start}", flush=True)

    x_test = to_input(data["test_x"])
    test_withheld = np.zeros(len(data["test_y"]), dtype=bool)
    for g in manifest["groups"]:
        test_withheld[g["test_indices"]] = True
    in_dist = torch.from_numpy(np.flatnonzero(~test_withheld))
    y_test = torch.from_numpy(data["test_y"].astype(np.int64))

    t0 = time.time()
    for epoch in range(start, epochs):
        model.train()
        perm = torch.randperm(len(keep), generator=gen)
        run_loss = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * batch:(i + 1) * batch]
            xb = augment(x_all[idx], gen)
            loss = F.cross_entropy(model(xb), y_all[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            run_loss += loss.item()
        acc = accuracy(model, x_test[in_dist], y_test[in_dist])
        print(f"{stage + ' ' if stage else ''}epoch {epoch + 1}/{epochs} loss {run_loss / steps_per_epoch:.4f} "
              f"in-dist test acc {acc:.4f} ({time.time() - t0:.0f}s)", flush=True)
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "generator": gen.get_state(),
                    "epoch": epoch + 1}, tmp)
        tmp.replace(ckpt)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    with atomic_path(stage_weights(work, stage)) as tmp:
        save_file(state, str(tmp))
    with atomic_path(work / "model.safetensors") as tmp:
        shutil.copyfile(stage_weights(work, stage), tmp)
    print(f"training done in {time.time() - t0:.0f}s", flush=True)


def accuracy(model, x, y, batch: int = 1000) -> float:
    return float((predict(model, x, batch) == y).float().mean())


def predict(model, x, batch: int = 1000):
    import torch
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(x[i:i + batch]).argmax(-1) for i in range(0, len(x), batch)])


# ----------------------------------------------------------------------------- cli

def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vitedit.zoo.fashion", description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=["split", "train", "restart", "package", "build", "test-images", "all-test-images", "preserve"])
    p.add_argument("--work", type=Path, default=Path("build/fashion"), help="working directory")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clusters", type=int, default=5)
    p.add_argument("--min-share", type=float, default=0.12)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--restart-epochs", type=_int_list, default=[],
                   help="after training, further cosine cycles of these many epochs each, e.g. 4,10 "
                        "(`build`: all of them; `restart`: the next one not finished)")
    p.add_argument("--restart-lr", type=float, default=2e-4, help="peak learning rate of each restart cycle")
    p.add_argument("--edit-lr", type=float, default=1e-3,
                   help="edit learning rate recorded as the default model's recommended --lr")
    p.add_argument("--assets", type=Path, default=Path(__file__).resolve().parent.parent / "assets" / "fashion",
                   help="where `package` writes the shipped assets")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    data = load_fashion(args.data_dir)
    split_path = args.work / "split.json"
    if args.step in ("split", "build") and not (args.resume and split_path.exists()):
        manifest = make_split(data, args.clusters, args.min_share, args.seed)
        split_path.write_text(json.dumps(manifest))
        for g in manifest["groups"]:
            print(f"class {g['class_index']} {g['class_name']:<12} withheld cluster {g['cluster']} "
                  f"share {g['cluster_share']:.3f} train {len(g['train_indices'])} "
                  f"test {len(g['test_indices'])}", flush=True)
    manifest = json.loads(split_path.read_text())
    if args.step in ("train", "build"):
        train(data, manifest, args.work, args.epochs, args.batch, args.lr, args.seed, args.resume,
              args.threads)
    stages = stage_names(len(args.restart_epochs))
    for i, (stage, epochs) in enumerate(zip(stages[1:], args.restart_epochs)):
        if args.step == "build" or (args.step == "restart" and not stage_weights(args.work, stage).exists()):
            train(data, manifest, args.work, epochs, args.batch, args.restart_lr, args.seed + 1 + i, args.resume,
                  args.threads, stage=stage, init=stages[i])
            if args.step == "restart":
                break
    if args.step in ("package", "build"):
        from vitedit.zoo._package import package
        package(data, manifest, args.work, args.assets, args)
    if args.step == "preserve":
        from vitedit.zoo._package import write_preserve
        n = write_preserve(data, manifest, args.assets / "preserve", seed=args.seed)
        print(f"{n} in-distribution training images in {args.assets / 'preserve'}", flush=True)
    if args.step in ("test-images", "all-test-images"):
        from vitedit.zoo._package import write_test_images
        n = write_test_images(data, manifest, args.work / args.step, everything=args.step == "all-test-images")
        print(f"{n} {'in-distribution ' if args.step == 'test-images' else ''}test images in {args.work / args.step}",
              flush=True)


if __name__ == "__main__":
    main()
