"""Inference latency of the exported ONNX file (onnxruntime, CPU) against PyTorch eager.

Two models are exported with ``vitedit.export.export_onnx`` (the library's verified, single-file
export with a dynamic batch axis):

- the default-size model: ``vitedit.models.load_model()`` when the embedded default
  (``vitedit/assets/fashion/model.json``) is installed; otherwise a random-init timm
  ``vit_tiny_patch16_224`` with img_size=28, patch_size=4, in_chans=1, num_classes=10,
  embed_dim=128, depth=6, num_heads=4 of the same shape (the script says which it used);
- a random-init ``vit_small_patch16_224`` at 224 px.

For batch 1 and 8: onnxruntime (``CPUExecutionProvider``, ``intra_op_num_threads`` = ``--threads``,
``inter_op_num_threads`` = 1, all graph optimizations) and PyTorch (``torch.inference_mode``), each
warmed up, then ``--runs`` timed runs *interleaved* (torch, ORT, torch, ORT, ...) so that load from
other jobs on the machine hits both alike; the median of each is reported.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_onnx.py            # defaults
    .venv/bin/python benchmarks/bench_onnx.py --runs 50 --threads 2 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

TARGET_RATIO = 1.0
BATCHES = (1, 8)

FALLBACK_KWARGS = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=128, depth=6, num_heads=4)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20, help="timed runs per engine and batch size")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ort-profile", action="store_true",
                    help="after timing, profile onnxruntime on each model at the largest batch and print the "
                         "share of kernel time per operator type")
    ap.add_argument("--json", action="store_true", help="also print one JSON object (last line of stdout)")
    return ap.parse_args(argv)


def default_model():
    """(model, data_config, labels, description)."""
    import timm
    import torch

    from vitedit.models import DEFAULT_ASSETS, load_model

    if (DEFAULT_ASSETS / "model.json").exists():
        loaded = load_model()
        return loaded.model, loaded.data_config, loaded.labels, "embedded default (vitedit/fashion-vit)"
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **FALLBACK_KWARGS).eval()
    data_config = {"input_size": (1, 28, 28), "mean": (0.5,), "std": (0.5,), "interpolation": "bilinear",
                   "crop_pct": 1.0, "crop_mode": "center"}
    desc = ("embedded default not installed: random-init vit_tiny_patch16_224 with "
            + ", ".join(f"{k}={v}" for k, v in FALLBACK_KWARGS.items()))
    return model, data_config, [str(i) for i in range(10)], desc


def vit_small():
    import timm
    import torch
    from timm.data import resolve_model_data_config

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    return model, resolve_model_data_config(model), [str(i) for i in range(model.num_classes)], \
        "random-init vit_small_patch16_224 at 224 px"


def bench_model(model, data_config, labels, args, workdir: Path, name: str) -> dict:
    import numpy as np
    import onnxruntime as ort
    import torch

    from vitedit.export import export_onnx, preprocessing_metadata

    c, h, w = (int(v) for v in data_config["input_size"])
    gen = torch.Generator().manual_seed(args.seed)
    example = torch.randn(max(BATCHES), c, h, w, generator=gen)
    meta = preprocessing_metadata(data_config, labels, c)
    t0 = time.perf_counter()
    res = export_onnx(model, workdir / f"{name}.onnx", example, metadata=meta)
    export_s = time.perf_counter() - t0

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(res.path), opts, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    out = {"export_seconds": export_s, "exporter": res.exporter, "opset": res.opset,
           "export_max_abs_diff": res.max_abs_diff, "file_mib": res.path.stat().st_size / 2**20,
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "input": [c, h, w], "batches": {}}
    for b in BATCHES:
        x = example[:b].contiguous()
        xn = x.numpy()

        def run_torch():
            with torch.inference_mode():
                return model(x)

        def run_ort():
            return session.run(None, {input_name: xn})[0]

        for _ in range(args.warmup):
            run_torch()
            run_ort()
        t_torch, t_ort = [], []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            y_t = run_torch()
            t_torch.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            y_o = run_ort()
            t_ort.append(time.perf_counter() - t0)
        med_t, med_o = statistics.median(t_torch), statistics.median(t_ort)
        out["batches"][b] = {"torch_ms": 1000 * med_t, "ort_ms": 1000 * med_o, "ratio": med_o / med_t,
                             "max_abs_diff": float(np.abs(y_o - y_t.numpy()).max())}
    if args.ort_profile:
        out["ort_profile"] = ort_op_profile(res.path, example.numpy(), args, workdir)
    return out


def ort_op_profile(path: Path, images, args, workdir: Path) -> dict:
    """Share of onnxruntime kernel time per operator type (optimized graph), over ``--runs`` runs."""
    import collections

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.enable_profiling = True
    opts.profile_file_prefix = str(workdir / f"{path.stem}-profile")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for _ in range(args.warmup + args.runs):
        session.run(None, {name: images})
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
    total = sum(per_op.values())
    runs = args.warmup + args.runs
    return {op: {"ms_per_run": us / runs / 1000, "share": us / total}
            for op, us in sorted(per_op.items(), key=lambda kv: -kv[1])}


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    import onnxruntime as ort
    import torch

    torch.set_num_threads(args.threads)
    results, descriptions = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as d:
        for name, make in (("default", default_model), ("vit_small", vit_small)):
            model, data_config, labels, desc = make()
            for p in model.parameters():
                p.requires_grad_(False)
            descriptions[name] = desc
            results[name] = bench_model(model, data_config, labels, args, Path(d), name)

    ratios = [r["batches"][b]["ratio"] for r in results.values() for b in BATCHES]
    report = {"benchmark": "onnx", "torch": torch.__version__, "onnxruntime": ort.__version__, "device": "cpu",
              "threads": torch.get_num_threads(), "runs": args.runs, "warmup": args.warmup,
              "models": {k: {"description": descriptions[k], **v} for k, v in results.items()},
              "worst_ratio": max(ratios), "target_ratio": TARGET_RATIO,
              "result": "PASS" if max(ratios) <= TARGET_RATIO else "MISS"}
    print(f"torch {report['torch']}, onnxruntime {report['onnxruntime']}, device cpu, threads {report['threads']}, "
          f"median of {args.runs} interleaved runs after {args.warmup} warm-up")
    for name, r in results.items():
        print(f"{name}: {descriptions[name]}")
        print(f"  {r['params_m']:.2f} M params, input {r['input']}, {r['exporter']} exporter, opset {r['opset']}, "
              f"{r['file_mib']:.1f} MiB, export+verify {r['export_seconds']:.1f} s, "
              f"verify max abs diff {r['export_max_abs_diff']:.2g}")
        for b, v in r["batches"].items():
            verdict = "PASS" if v["ratio"] <= TARGET_RATIO else "MISS"
            print(f"  batch {b}: PyTorch {v['torch_ms']:8.2f} ms   onnxruntime {v['ort_ms']:8.2f} ms   "
                  f"ORT/PyTorch {v['ratio']:.2f} (target <= {TARGET_RATIO}): {verdict}   "
                  f"max abs diff {v['max_abs_diff']:.2g}")
        if "ort_profile" in r:
            top = list(r["ort_profile"].items())[:6]
            print(f"  onnxruntime kernel time by operator at batch {max(BATCHES)} (mean over warm-up + timed runs): "
                  + ", ".join(f"{op} {v['ms_per_run']:.1f} ms ({100 * v['share']:.0f}%)" for op, v in top))
    print(f"worst ORT/PyTorch latency ratio {report['worst_ratio']:.2f} (target <= {TARGET_RATIO}): {report['result']}")
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
