"""The benchmark of the real-weights case (docs/dinov2-case.md, docs/dinov2-benchmark.md): every failure
group of ``dinov2-fashion``, 10-image edits, the default editor against the paper's (``--editor plain``),
each edit run through the CLI as a user runs it and scored through its exported ONNX file.

Per group, in its own workspace under WORK (default build/dinov2-bench/<group>/):

    vitedit locate <case>/failures/<group> --model local-dir:<case>/model --edit-images 10 --locator gradient --offline -w WS -q
    vitedit apply -w WS --sparsity 0.05 [--editor plain] --preserve <case>/preserve --check <case>/check --locality <case>/locality --json -q   (timed whole, wall clock)
    vitedit export E.onnx -w WS -q                                    (and once --base: base.onnx)

and E.onnx is scored with benchmarks/score_onnx.py's own preprocessing (from the ONNX metadata only)
and onnxruntime (one thread) on the case's check set against base.onnx: accuracy drop (points, with a
paired 95% interval), flip rate. The check set is the case's only labeled in-distribution test set
disjoint from the failures and the preserve set, so `apply` measured on it too.

One JSON per group and editor goes to OUT (default docs/benchmark-results/dinov2/bench/), then
summary.csv, summary.json and a printed table. Resumable: a group+editor whose JSON exists is skipped.
``--stack`` afterwards stacks every group in one workspace (default editor, ``--on-top``) and scores it.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dinov2_bench.py [--groups coat,sneaker] [--stack]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
VITEDIT = [str(REPO / ".venv/bin/vitedit")] if (REPO / ".venv/bin/vitedit").exists() else ["vitedit"]
EDITORS = {"default": [], "plain": ["--editor", "plain"]}


def case_dir() -> Path:
    from vitedit.demo import case_folder

    return case_folder("dinov2-fashion")


def portable(obj, case: Path):
    """Every path in a result made relative: the case folder as <VITEDIT_HOME>/examples/dinov2-fashion,
    the repository as its root."""
    if isinstance(obj, dict):
        return {k: portable(v, case) for k, v in obj.items()}
    if isinstance(obj, list):
        return [portable(v, case) for v in obj]
    if isinstance(obj, str):
        for real in {str(case.resolve()), str(case)}:
            obj = obj.replace(real, "<VITEDIT_HOME>/examples/dinov2-fashion")
        for real in {str(REPO.resolve()) + "/", str(REPO) + "/"}:
            obj = obj.replace(real, "")
        return obj
    return obj


def sh(args: list[str], log) -> str:
    log.write("$ " + " ".join(args) + "\n")
    log.flush()
    r = subprocess.run(args, stdout=subprocess.PIPE, stderr=log, text=True)
    if r.returncode:
        raise SystemExit(f"exit {r.returncode}: {' '.join(args)} (see {log.name})")
    return r.stdout


class Scorer:
    """score_onnx.py's scoring, with the check images loaded and the base model run once."""

    def __init__(self, base_onnx: Path, images: Path):
        import onnx
        from PIL import Image

        from score_onnx import predict, preprocess_from_metadata
        from vitedit.data import scan_labeled

        meta = {m.key: m.value for m in onnx.load(str(base_onnx), load_external_data=False).metadata_props}
        self.labels = json.loads(meta["vitedit.labels"])
        refs = scan_labeled(images, self.labels)
        prep = preprocess_from_metadata(meta)
        self.images = [prep(Image.open(r.path)) for r in refs]
        self.y = np.array([r.label for r in refs])
        self.predict = predict
        self.base = predict(base_onnx, self.images)

    def score(self, onnx_path: Path) -> dict:
        pred = self.predict(onnx_path, self.images)
        b, e = (self.base == self.y).astype(float), (pred == self.y).astype(float)
        d = b - e
        half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
        return {"images": int(len(self.y)), "base_accuracy": float(b.mean()), "accuracy": float(e.mean()),
                "accuracy_drop": round(100 * float(d.mean()), 3),
                "accuracy_drop_ci95": [round(100 * (float(d.mean()) - half), 3), round(100 * (float(d.mean()) + half), 3)],
                "flip_rate": float((self.base != pred).mean()),
                "per_class": {self.labels[c]: {"images": int((self.y == c).sum()),
                                               "base": float(b[self.y == c].mean()), "edited": float(e[self.y == c].mean())}
                              for c in sorted(set(self.y.tolist()))}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", help="comma-separated; default: every group, largest first")
    p.add_argument("--work", type=Path, default=REPO / "build/dinov2-bench")
    p.add_argument("--out", type=Path, default=REPO / "docs/benchmark-results/dinov2/bench")
    p.add_argument("--stack", action="store_true", help="after the groups: all of them stacked in one workspace")
    p.add_argument("--editors", default="default,plain",
                   help="in this order: every group with the first editor, then every group with the next")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=EDIT.toml",
                   help="one more editor: the default preset with this --config file (repeatable; run it by naming "
                        "NAME in --editors)")
    p.add_argument("--summary-only", action="store_true")
    args = p.parse_args(argv)
    for v in args.variant:
        name, _, path = v.partition("=")
        EDITORS[name] = ["--config", str(Path(path).resolve())]
    case = case_dir()
    meta = json.loads((case / "case.json").read_text())
    model = f"local-dir:{case / meta['model']['folder']}"
    sets = {k: case / meta["sets"][k] for k in ("preserve", "check", "locality")}
    groups = sorted((d for d in (case / "failures").iterdir() if d.is_dir()),
                    key=lambda d: -sum(1 for _ in d.rglob("*.png")))
    if args.groups:
        want = args.groups.split(",")
        groups = [g for g in groups if g.name in want]
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.work / "commands.log", "a")
    apply_sets = ["--preserve", str(sets["preserve"]), "--check", str(sets["check"]), "--locality", str(sets["locality"])]
    scorer = None
    base_onnx = args.work / "base.onnx"

    def get_scorer(ws: Path) -> Scorer:
        nonlocal scorer
        if not base_onnx.exists():
            sh(VITEDIT + ["export", str(base_onnx), "-w", str(ws), "--base", "-q"], log)
        if scorer is None:
            scorer = Scorer(base_onnx, sets["check"])
        return scorer

    editors = args.editors.split(",")
    for editor, g in [(e, g) for e in editors for g in groups] if not args.summary_only else []:
        if (args.out / f"{g.name}-{editor}.json").exists():
            print(f"{g.name} {editor}: done, skipped", flush=True)
            continue
        gw = args.work / g.name
        ws = gw / "ws"
        located = gw / "locate.json"
        if not located.exists():
            t0 = time.time()
            out = sh(VITEDIT + ["locate", str(g), "--model", model, "--edit-images", "10", "--locator", "gradient",
                                "--offline", "-w", str(ws), "--json", "-q"], log)
            loc = json.loads(out)
            loc["wall_s"] = round(time.time() - t0, 1)
            located.write_text(json.dumps(loc, indent=2))
        loc = json.loads(located.read_text())
        t0 = time.time()
        out = sh(VITEDIT + ["apply", "-w", str(ws), "--sparsity", "0.05", *EDITORS[editor], *apply_sets,
                            "--json", "-q"], log)
        wall = time.time() - t0
        res = json.loads(out)
        onnx_path = gw / f"{editor}.onnx"
        sh(VITEDIT + ["export", str(onnx_path), "-w", str(ws), "-q"], log)
        onnx_score = get_scorer(ws).score(onnx_path)
        row = {"group": g.name, "editor": editor, "editor_preset": res.get("objective"),
               "failures": sum(1 for _ in g.rglob("*.png")),
               "locate_wall_s": loc["wall_s"], "apply_wall_s": round(wall, 1),
               "steps": res.get("steps"), "success": res.get("success"),
               "held_out_fixed": res.get("generalization"),
               "onnx": onnx_score, "apply": res, "locate": loc,
               "threads": os.environ.get("OMP_NUM_THREADS")}
        (args.out / f"{g.name}-{editor}.json").write_text(json.dumps(portable(row, case), indent=2) + "\n")
        print(f"{g.name} {editor}: apply {wall:.0f}s, {res.get('steps')} steps, success {res.get('success')}, "
              f"held-out fixed {res.get('generalization')}, ONNX drop {onnx_score['accuracy_drop']} points, "
              f"flips {100 * onnx_score['flip_rate']:.1f}%", flush=True)
        summarize(args.out, quiet=True)

    if args.stack and not (args.out / "stacked.json").exists():
        ws = args.work / "stacked" / "ws"
        steps = []
        for i, g in enumerate(groups):
            on_top = ["--on-top"] if i else []
            t0 = time.time()
            sh(VITEDIT + ["locate", str(g), "--model", model, "--edit-images", "10", "--locator", "gradient",
                          "--offline", "-w", str(ws), "-q", *on_top], log)
            res = json.loads(sh(VITEDIT + ["apply", "-w", str(ws), "--sparsity", "0.05", *apply_sets, "--json", "-q",
                                           *on_top], log))
            steps.append({"group": g.name, "wall_s": round(time.time() - t0, 1), "steps": res.get("steps"),
                          "success": res.get("success"), "held_out_fixed": res.get("generalization"), "apply": res})
            print(f"stacked +{g.name}: {steps[-1]['wall_s']}s", flush=True)
        onnx_path = args.work / "stacked" / "stacked.onnx"
        sh(VITEDIT + ["export", str(onnx_path), "-w", str(ws), "-q"], log)
        row = {"groups": [g.name for g in groups], "edits": steps, "onnx": get_scorer(ws).score(onnx_path)}
        (args.out / "stacked.json").write_text(json.dumps(portable(row, case), indent=2) + "\n")

    summarize(args.out)


def summarize(out: Path, quiet: bool = False) -> None:
    rows = [json.loads(f.read_text()) for f in sorted(out.glob("*-*.json"))]
    cols = ["group", "editor", "failures", "apply_wall_s", "steps", "success", "held_out_fixed", "onnx_drop_points",
            "onnx_drop_ci95_low", "onnx_drop_ci95_high", "onnx_flip_rate", "check_drop_points_apply", "check_flip_rate_apply"]
    table = []
    for r in rows:
        table.append({"group": r["group"], "editor": r["editor"], "failures": r["failures"],
                      "apply_wall_s": r["apply_wall_s"], "steps": r["steps"], "success": r["success"],
                      "held_out_fixed": r["held_out_fixed"], "onnx_drop_points": r["onnx"]["accuracy_drop"],
                      "onnx_drop_ci95_low": r["onnx"]["accuracy_drop_ci95"][0],
                      "onnx_drop_ci95_high": r["onnx"]["accuracy_drop_ci95"][1],
                      "onnx_flip_rate": round(r["onnx"]["flip_rate"], 4),
                      "check_drop_points_apply": r["apply"].get("accuracy_drop"),
                      "check_flip_rate_apply": r["apply"].get("flip_rate")})
    table.sort(key=lambda t: (t["editor"], -t["failures"]))
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(table)
    means = {}
    for editor in dict.fromkeys(t["editor"] for t in table):
        sel = [t for t in table if t["editor"] == editor]
        if sel:
            means[editor] = {"groups": len(sel), **{k: round(float(np.mean([t[k] for t in sel])), 4) for k in
                                                    ("apply_wall_s", "steps", "success", "held_out_fixed",
                                                     "onnx_drop_points", "onnx_flip_rate")},
                             "max_apply_wall_s": max(t["apply_wall_s"] for t in sel)}
    (out / "summary.json").write_text(json.dumps({"rows": table, "means": means}, indent=2) + "\n")
    if quiet:
        return
    print(f"{'group':<12} {'editor':<8} {'fail':>4} {'apply s':>8} {'steps':>5} {'succ':>5} {'held-out':>8} "
          f"{'ONNX drop':>9} {'95% CI':>15} {'flips':>6}")
    for t in table:
        print(f"{t['group']:<12} {t['editor']:<8} {t['failures']:>4} {t['apply_wall_s']:>8.1f} {t['steps']:>5} "
              f"{t['success']:>5.2f} {t['held_out_fixed']:>8.3f} {t['onnx_drop_points']:>9.2f} "
              f"[{t['onnx_drop_ci95_low']:>5.2f}, {t['onnx_drop_ci95_high']:>5.2f}] {100 * t['onnx_flip_rate']:>5.1f}%")
    for editor, m in means.items():
        print(f"mean {editor} ({m['groups']} groups): apply {m['apply_wall_s']:.0f}s (max {m['max_apply_wall_s']:.0f}s), "
              f"held-out fixed {m['held_out_fixed']:.3f}, ONNX drop {m['onnx_drop_points']:.2f} points, "
              f"flips {100 * m['onnx_flip_rate']:.1f}%")


if __name__ == "__main__":
    main()
