"""The bundled examples and ``vitedit demo``: the whole job on the embedded default, offline.

``examples()`` lists the failure groups shipped with the default model (withheld-subpopulation test
images it gets wrong, see docs/default-model.md). ``run_demo`` copies one group into a fresh
workspace folder and runs locate -> apply -> report -> export on it, returning every step's result.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import UsageError
from .models import DEFAULT_ASSETS


def examples() -> list[dict]:
    root = DEFAULT_ASSETS / "failures"
    if not root.is_dir():
        return []
    meta = json.loads((DEFAULT_ASSETS / "model.json").read_text())
    info = {g["group"]: g for g in meta["figures"]["groups"]}
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        n = sum(1 for f in d.rglob("*.png"))
        g = info.get(d.name, {})
        out.append({"group": d.name, "class": g.get("class_name"), "failures": n,
                    "withheld_test_images": g.get("withheld_test_images"), "path": str(d)})
    return out


def example_path(group: str) -> Path:
    known = {e["group"]: e for e in examples()}
    if group not in known:
        raise UsageError(f"no bundled example group {group!r}; choose one of {', '.join(sorted(known)) or '(none)'} "
                         "(see `vitedit examples`)")
    return Path(known[group]["path"])


@dataclass(frozen=True)
class DemoConfig:
    group: str | None = None          # None: the group with the most failures
    out: Path = Path("vitedit-demo")
    sparsity: float = 0.05
    sparsities: tuple[float, ...] = (0.05, 0.25)
    device: str = "cpu"
    seed: int = 0
    edit_images: int = 10
    objective: str = "local"
    preserve_weights: tuple[float, ...] = (1.0, 3.0)


def run_demo(cfg: DemoConfig, progress: Callable[[str, int, int], None]) -> dict:
    from .pipeline import (ApplyConfig, ExperimentOptions, ExportJob, LocateConfig, ModelOptions, ReportConfig,
                           run_apply, run_export, run_locate, run_report)

    groups = examples()
    if not groups:
        raise UsageError("this installation has no bundled examples; reinstall vitedit")
    group = cfg.group or max(groups, key=lambda g: g["failures"])["group"]
    src = example_path(group)
    out = Path(cfg.out)
    failures = out / "failures"
    if failures.exists():
        shutil.rmtree(failures)  # our own copy from a previous demo run
    shutil.copytree(src, failures)
    ws = out / "workspace"
    located = run_locate(LocateConfig(failures, ModelOptions(device=cfg.device), seed=cfg.seed, workspace=ws,
                                      max_edit_images=cfg.edit_images), progress)
    experiment = ExperimentOptions(device=cfg.device, objective=cfg.objective)
    applied = run_apply(ApplyConfig(ws, cfg.sparsity, experiment), progress)
    reported = run_report(ReportConfig(ws, cfg.sparsities, plot=out / "tradeoff.png", experiment=experiment,
                                       preserve_weights=cfg.preserve_weights, html=out / "report.html",
                                       command="vitedit demo"), progress)
    exported = run_export(ExportJob(out / "edited.onnx", ws), progress)
    return {"group": group, "failures_dir": str(failures), "locate": located, "apply": applied, "report": reported,
            "export": exported}
