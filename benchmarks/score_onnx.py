"""Score an exported model the way its user would: the ONNX file alone, on a labeled image folder.

Preprocessing comes only from the file's ``vitedit.*`` metadata (input size, crop, interpolation,
mean, std, channels) and class names from ``vitedit.labels``; the model runs in onnxruntime. With
``--base BASE.onnx`` (the unedited export) it also prints the accuracy drop in points and the flip
rate (share of images whose top-1 changed), and, with ``--per-class``, the accuracy of every class.

    .venv/bin/python benchmarks/score_onnx.py edited.onnx build/fashion/test-images --base base.onnx
    .venv/bin/python benchmarks/score_onnx.py edited.onnx build/fashion/all-test-images --base base.onnx --json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def preprocess_from_metadata(meta: dict):
    """PIL image -> (C, H, W) float32 array, as timm's eval transform: resize the shorter side to
    size / crop_pct, centre crop, scale to [0, 1], normalize."""
    from PIL import Image

    channels, height, width = (int(v) for v in meta["vitedit.input_size"].split(","))
    crop_pct = float(meta["vitedit.crop_pct"])
    mean = np.array(json.loads(meta["vitedit.mean"]), dtype=np.float32)[:, None, None]
    std = np.array(json.loads(meta["vitedit.std"]), dtype=np.float32)[:, None, None]
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}.get(
        meta["vitedit.interpolation"], Image.BILINEAR)

    def run(img: "Image.Image") -> np.ndarray:
        img = img.convert("L" if channels == 1 else "RGB")
        scale = math.floor(min(height, width) / crop_pct)
        w, h = img.size
        if (w, h) != (scale, scale) and min(w, h) != scale:
            r = scale / min(w, h)
            img = img.resize((max(1, round(w * r)), max(1, round(h * r))), resample)
        w, h = img.size
        left, top = int(round((w - width) / 2)), int(round((h - height) / 2))
        img = img.crop((left, top, left + width, top + height))
        x = np.asarray(img, dtype=np.float32) / 255.0
        x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
        return (x - mean) / std

    return run


def predict(path: Path, images: list[np.ndarray], batch: int = 256) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out = [session.run(None, {name: np.stack(images[i:i + batch])})[0] for i in range(0, len(images), batch)]
    return np.concatenate(out).argmax(-1)


def main(argv: list[str] | None = None) -> dict:
    import onnx
    from PIL import Image

    from vitedit.artifacts import portable_path
    from vitedit.data import scan_labeled

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("images", type=Path, help="labeled folder: one sub-folder per true class")
    p.add_argument("--base", type=Path, help="the unedited export, for the accuracy drop and flip rate")
    p.add_argument("--per-class", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    meta = {m.key: m.value for m in onnx.load(str(args.model), load_external_data=False).metadata_props}
    labels = json.loads(meta["vitedit.labels"])
    refs = scan_labeled(args.images, labels)
    prep = preprocess_from_metadata(meta)
    images = [prep(Image.open(r.path)) for r in refs]
    y = np.array([r.label for r in refs])
    pred = predict(args.model, images)
    # Paths as the repository names them: this output is committed (docs/benchmark-results/sequential/).
    model_name, folder = (portable_path(a, root=REPO) for a in (args.model, args.images))
    res = {"model": model_name, "images": len(y), "folder": folder, "accuracy": float((pred == y).mean())}
    if args.base:
        base = predict(args.base, images)
        res.update(base_accuracy=float((base == y).mean()),
                   accuracy_drop=round(100 * float((base == y).mean() - (pred == y).mean()), 3),
                   flip_rate=float((base != pred).mean()))
        if args.per_class:
            res["per_class"] = {labels[c]: {"images": int((y == c).sum()), "base": float((base[y == c] == c).mean()),
                                            "edited": float((pred[y == c] == c).mean())} for c in sorted(set(y.tolist()))}
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        line = f"{model_name}: accuracy {res['accuracy']:.4f} on {len(y)} images of {folder}"
        if args.base:
            line += (f"; base {res['base_accuracy']:.4f}, drop {res['accuracy_drop']:.2f} points, "
                     f"flip rate {100 * res['flip_rate']:.2f}%")
        print(line)
        for name, d in (res.get("per_class") or {}).items():
            print(f"  {name:<12} {d['images']:>5}  {d['base']:.3f} -> {d['edited']:.3f}")
    return res


if __name__ == "__main__":
    main()
