"""The bundled examples and ``vitedit demo``: the whole job on the embedded default, offline.

``examples()`` lists the failure groups shipped with the default model (withheld-subpopulation test
images it gets wrong, see docs/default-model.md), or those of a *built case* (``case=``): a case on
real pretrained weights built on demand under ``<VITEDIT_HOME>/examples/<case>/`` (see
``vitedit.zoo.dinov2`` and docs/dinov2-case.md). ``run_demo`` copies one group into a fresh
workspace folder and runs locate -> apply -> report -> export on it, returning every step's result;
on a built case it uses the case's model folder and its preserve, check and locality sets.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import UsageError
from .models import DEFAULT_ASSETS

BUILT_CASES = {"dinov2-fashion": "vitedit examples dinov2-fashion --build"}  # name -> the command that builds it


def case_folder(case: str) -> Path:
    """Where a built case lives: ``<VITEDIT_HOME>/examples/<case>``, else platformdirs' user data dir."""
    from .hub import vitedit_home

    if case not in BUILT_CASES:
        raise UsageError(f"no case {case!r}; choose one of {', '.join(sorted(BUILT_CASES))}")
    home = vitedit_home()
    if home is None:
        import platformdirs

        home = Path(platformdirs.user_data_dir("vitedit"))
    return home / "examples" / case


def built_case(case: str) -> tuple[Path, dict]:
    """A built case's folder and its ``case.json``; a ``UsageError`` naming the build command if absent."""
    from .artifacts import read_json

    folder = case_folder(case)
    if not (folder / "case.json").is_file():
        raise UsageError(f"the {case} case is not built in {folder}; build it with `{BUILT_CASES[case]}` "
                         "(VITEDIT_HOME chooses where)")
    return folder, read_json(folder / "case.json", "case file")


def examples(case: str | None = None) -> list[dict]:
    if case is None:
        root = DEFAULT_ASSETS / "failures"
        if not root.is_dir():
            return []
        meta = json.loads((DEFAULT_ASSETS / "model.json").read_text())
    else:
        folder, meta = built_case(case)
        root = folder / meta["sets"]["failures"]
    info = {g["group"]: g for g in meta["figures"]["groups"]}
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        n = sum(1 for f in d.rglob("*.png"))
        g = info.get(d.name, {})
        out.append({"group": d.name, "class": g.get("class_name"), "failures": n,
                    "withheld_test_images": g.get("withheld_test_images"), "path": str(d)})
    return out


def example_path(group: str, case: str | None = None) -> Path:
    known = {e["group"]: e for e in examples(case)}
    if group not in known:
        where = f" in the {case} case" if case else ""
        raise UsageError(f"no example group {group!r}{where}; choose one of {', '.join(sorted(known)) or '(none)'} "
                         f"(see `vitedit examples{' ' + case if case else ''}`)")
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
    case: str | None = None           # a built case (e.g. "dinov2-fashion"); None: the embedded default


def run_demo(cfg: DemoConfig, progress: Callable[[str, int, int], None]) -> dict:
    from .pipeline import (ApplyConfig, ExperimentOptions, ExportJob, LocateConfig, ModelOptions, ReportConfig,
                           run_apply, run_export, run_locate, run_report)

    groups = examples(cfg.case)
    if not groups:
        raise UsageError("this installation has no bundled examples; reinstall vitedit")
    group = cfg.group or max(groups, key=lambda g: g["failures"])["group"]
    src = example_path(group, cfg.case)
    model, sets = ModelOptions(device=cfg.device), {}
    if cfg.case is not None:
        folder, meta = built_case(cfg.case)
        model = ModelOptions(name=f"local-dir:{folder / meta['model']['folder']}", device=cfg.device, offline=True)
        sets = {k: folder / meta["sets"][k] for k in ("preserve", "check", "locality")}
    out = Path(cfg.out)
    failures = out / "failures"
    if failures.exists():
        shutil.rmtree(failures)  # our own copy from a previous demo run
    shutil.copytree(src, failures)
    ws = out / "workspace"
    located = run_locate(LocateConfig(failures, model, seed=cfg.seed, workspace=ws,
                                      max_edit_images=cfg.edit_images), progress)
    experiment = ExperimentOptions(device=cfg.device, objective=cfg.objective, **sets)
    applied = run_apply(ApplyConfig(ws, cfg.sparsity, experiment), progress)
    reported = run_report(ReportConfig(ws, cfg.sparsities, plot=out / "tradeoff.png", experiment=experiment,
                                       preserve_weights=cfg.preserve_weights, html=out / "report.html",
                                       command="vitedit demo"), progress)
    exported = run_export(ExportJob(out / "edited.onnx", ws), progress)
    return {"group": group, "failures_dir": str(failures), "locate": located, "apply": applied, "report": reported,
            "export": exported}
