"""Start-up cost of the ``vitedit`` command line against a bare Python interpreter.

Median wall time of ``vitedit --help`` against ``python -c pass`` over ``--runs`` runs each,
interleaved, every one a fresh process. ``vitedit`` is the console script ``pip install`` makes from
*this checkout's* ``pyproject.toml`` (its ``[project.scripts]`` entry, in pip's launcher template, run
by this interpreter), and the children get this checkout first on ``PYTHONPATH``: the figures are of
the code beside this script, whatever an older or editable install elsewhere put in ``.venv/bin``. Two bytecode set-ups are timed: ``as-is`` (the environment inherited; where
``PYTHONDONTWRITEBYTECODE`` is set, as on the development machines, vitedit's own modules are compiled
from source at every start because an editable install has no ``.pyc``) and ``bytecode`` (children
may write bytecode, into a temporary ``PYTHONPYCACHEPREFIX`` so the checkout is not touched, as a
``pip install`` that compiles ``.pyc`` gives every user). Then, in fresh subprocesses, which heavy packages (torch, timm, onnx, onnxruntime,
numpy, ...) ``import vitedit.cli`` and a full ``vitedit --help`` pull in, and the slowest imports of
``vitedit --help`` (the entry point's module and what it runs) by ``python -X importtime``
(cumulative microseconds).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_startup.py           # defaults
    .venv/bin/python benchmarks/bench_startup.py --runs 30 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_RATIO = 3.0
ROOT = Path(__file__).resolve().parents[1]
# pip's console-script template (what `pip install` writes to .venv/bin/NAME).
LAUNCHER = """#!{python}
# -*- coding: utf-8 -*-
import re
import sys
from {module} import {func}
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit({func}())
"""
HEAVY = ("torch", "timm", "onnx", "onnxruntime", "onnxscript", "numpy", "PIL", "safetensors", "huggingface_hub",
         "matplotlib", "rich", "typer")

PROBE = """
import atexit, json, sys
heavy = {heavy!r}
def report():
    sys.stderr.write("MODULES " + json.dumps(sorted(m for m in heavy if m in sys.modules)) + "\\n")
atexit.register(report)
{body}
"""


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10, help="timed runs of each command")
    ap.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of the child processes")
    ap.add_argument("--top", type=int, default=5, help="slowest imports to list")
    ap.add_argument("--json", action="store_true", help="also print one JSON object (last line of stdout)")
    return ap.parse_args(argv)


def wall(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def loaded_modules(body: str, env: dict) -> list[str]:
    code = PROBE.format(heavy=HEAVY, body=body)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    for line in proc.stderr.splitlines():
        if line.startswith("MODULES "):
            return json.loads(line[len("MODULES "):])
    raise RuntimeError(f"probe failed: {proc.stderr[-500:]}")


def entry_point() -> tuple[str, str]:
    """(module, function) of the ``vitedit`` console script in this checkout's pyproject.toml."""
    import tomllib

    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["vitedit"]
    module, func = spec.split(":")
    return module.strip(), func.strip()


def write_launcher(folder: Path) -> Path:
    module, func = entry_point()
    path = folder / "vitedit"
    path.write_text(LAUNCHER.format(python=sys.executable, module=module, func=func))
    path.chmod(0o755)
    return path


def slowest_imports(env: dict, top: int) -> list[tuple[str, int]]:
    module, func = entry_point()
    code = f"import sys\nsys.argv = ['vitedit', '--help']\nfrom {module} import {func}\ntry:\n    {func}()\nexcept SystemExit:\n    pass"
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, check=True)
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = (part.strip() for part in line[len("import time:"):].split("|"))
        rows.append((name, int(cumulative)))
    return sorted(rows, key=lambda r: -r[1])[:top]


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    module, func = entry_point()
    with tempfile.TemporaryDirectory(prefix="bench-startup-pyc-") as pyc, \
            tempfile.TemporaryDirectory(prefix="bench-startup-bin-") as bindir:
        script = write_launcher(Path(bindir))
        cmds = {"vitedit --help": [str(script), "--help"], "python -c pass": [sys.executable, "-c", "pass"]}
        bytecode_env = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
        bytecode_env["PYTHONPYCACHEPREFIX"] = pyc
        modes = {"as-is": env, "bytecode": bytecode_env}
        for mode_env in modes.values():
            for cmd in cmds.values():  # warm the page cache (and write the bytecode)
                wall(cmd, mode_env)
        times = {m: {k: [] for k in cmds} for m in modes}
        for _ in range(args.runs):
            for mode, mode_env in modes.items():
                for name, cmd in cmds.items():
                    times[mode][name].append(wall(cmd, mode_env))
    med = {m: {k: statistics.median(v) for k, v in t.items()} for m, t in times.items()}
    ratios = {m: med[m]["vitedit --help"] / med[m]["python -c pass"] for m in modes}
    ratio = max(ratios.values())

    mods_import = loaded_modules("import vitedit.cli", env)
    mods_help = loaded_modules(f"import sys\nsys.argv = ['vitedit', '--help']\nfrom {module} import {func}\n"
                               f"try:\n    {func}()\nexcept SystemExit:\n    pass", env)
    slow = slowest_imports(env, args.top)
    heavy_core = [m for m in ("torch", "timm", "onnx", "onnxruntime") if m in mods_import or m in mods_help]

    report = {"benchmark": "startup", "python": sys.version.split()[0], "device": "cpu", "threads": args.threads,
              "console_script": f"{module}:{func}", "checkout": str(ROOT),
              "pythondontwritebytecode": bool(env.get("PYTHONDONTWRITEBYTECODE")),
              "runs": args.runs, "median_s": med, "ratios": ratios, "worst_ratio": ratio,
              "target_ratio": TARGET_RATIO,
              "result": "PASS" if ratio <= TARGET_RATIO else "MISS",
              "import_vitedit_cli_loads": mods_import, "vitedit_help_loads": mods_help,
              "imports_torch_timm_onnx": bool(heavy_core),
              "slowest_imports_us": dict(slow)}
    print(f"python {report['python']}, device cpu, threads {args.threads} (child processes), "
          f"median of {args.runs} interleaved runs")
    print(f"  vitedit = the console script of {ROOT / 'pyproject.toml'} ({module}:{func}), importing from {ROOT}")
    for mode in modes:
        print(f"  {mode:<9} " + "   ".join(f"{name} {1000 * t:6.1f} ms" for name, t in med[mode].items())
              + f"   ratio {ratios[mode]:.2f}x: {'PASS' if ratios[mode] <= TARGET_RATIO else 'MISS'}")
    print(f"  (PYTHONDONTWRITEBYTECODE is {'set' if report['pythondontwritebytecode'] else 'not set'} "
          "in the inherited environment)")
    print(f"  of the heavy packages {', '.join(HEAVY)}:")
    print(f"    `import vitedit.cli` loads: {', '.join(mods_import) or 'none'}")
    print(f"    `vitedit --help` loads:     {', '.join(mods_help) or 'none'}")
    print(f"    torch/timm/onnx/onnxruntime imported: {'yes: ' + ', '.join(heavy_core) if heavy_core else 'no'}")
    print(f"  slowest imports of `vitedit --help` ({module}:{func}; cumulative):")
    for name, us in slow:
        print(f"    {us / 1000:7.1f} ms  {name}")
    print(f"vitedit --help / python -c pass, worst of the two set-ups {ratio:.2f}x (target <= {TARGET_RATIO}x): "
          f"{report['result']}")
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
