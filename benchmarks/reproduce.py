"""Rerun a small subset of the published comparison and check it reproduces the committed rows.

    OMP_NUM_THREADS=1 python benchmarks/reproduce.py [--groups coat] [--methods hypernet,random] [--sparsities 0.05]

runs ``vitedit-lab compare`` on those groups, methods and sparsities with the published edits per
group, single-image edits, and ``--compare docs/benchmark-results/results.json``, then exits 1 unless
every edit both runs made is identical (every metric of every edit) and every matched per-group mean
lies in the published 95% CI. Image draws and random masks are seeded per group and setting, so the
subset's edits are exactly the published run's edits of that group and setting.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = REPO / "docs/benchmark-results/results.json"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", default="coat")
    p.add_argument("--methods", default="hypernet,random")
    p.add_argument("--sparsities", default="0.05")
    p.add_argument("--published", type=Path, default=PUBLISHED)
    args = p.parse_args(argv)
    published = json.loads(args.published.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "vitedit.lab.cli", "compare", "--groups", args.groups, "--methods", args.methods,
               "--sparsities", args.sparsities, "--edit-sizes", "1",
               "--edits-per-group", str(published["edits_per_group"]), "--out", str(Path(tmp) / "rerun"),
               "--compare", str(args.published), "--json", "-q"]
        print("$ vitedit-lab " + " ".join(cmd[3:]), flush=True)
        res = json.loads(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout)
    c = res["comparison"]
    print(f"{c['edits_identical']}/{c['edits_matched']} edits identical to the published ones; "
          f"{c['values_checked'] - c['values_outside_ci']}/{c['values_checked']} per-group means within the published "
          f"95% CI")
    for o in c["outside"][:10]:
        print(f"  outside: {o['group']} k={o['edit_images']} {o['method']} {o['setting']:g} {o['metric']}: "
              f"published {o['published']:.4f}, rerun {o['rerun']:.4f}")
    ok = c["edits_matched"] > 0 and c["edits_identical"] == c["edits_matched"] and c["values_outside_ci"] == 0
    print("reproduced" if ok else "NOT reproduced")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
