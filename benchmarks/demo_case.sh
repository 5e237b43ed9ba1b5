#!/usr/bin/env bash
# The demo case through the CLI, as a user runs it: the shirt group, 10 edit images, one workspace;
# `vitedit apply` with the paper's editor and with the default one, each timed whole (wall clock,
# same run, same workspace), exported to ONNX and scored with onnxruntime on the 7,953
# in-distribution test images (preprocessing from the ONNX metadata only).
#   python -m vitedit.zoo.fashion test-images --work build/fashion
#   OMP_NUM_THREADS=1 bash benchmarks/demo_case.sh build/demo-case
set -euo pipefail
out=${1:-build/demo-case}
root=$(cd "$(dirname "$0")/.." && pwd)
vitedit() { "$root/.venv/bin/vitedit" "$@"; }
py() { "$root/.venv/bin/python" "$@"; }
mkdir -p "$out"; cd "$out"; rm -rf ws times.txt
vitedit locate "$root/vitedit/assets/fashion/failures/shirt" -w ws --edit-images 10 -q > /dev/null
vitedit export base.onnx -w ws --base -q
for editor in plain default plain default; do  # twice each, interleaved: the second pair is the one timed
  flag=(); [ "$editor" = plain ] && flag=(--objective plain)
  start=$(date +%s.%N)
  vitedit apply -w ws --sparsity 0.05 ${flag[@]+"${flag[@]}"} --json -q > "apply-$editor.json"
  end=$(date +%s.%N)
  echo "$editor $(py -c "print(round($end - $start, 1))")" >> times.txt
  vitedit export "$editor.onnx" -w ws -q
done
for editor in plain default; do
  py -c "import json; r=json.load(open('apply-$editor.json')); print('$editor: apply', r['objective'], 'steps', r['steps'], 'success', r['success'], 'held-out fixed', round(r['generalization'], 4), 'check drop', r['accuracy_drop'], 'flips', r['flip_rate'])"
  py "$root/benchmarks/score_onnx.py" "$editor.onnx" "$root/build/fashion/test-images" --base base.onnx
done
py - <<'PY'
t = {}
for line in open("times.txt"):
    k, v = line.split(); t.setdefault(k, []).append(float(v))
print("whole `vitedit apply` wall time, s (two runs each, interleaved):", t)
print(f"default / plain (second runs): {t['default'][-1] / t['plain'][-1]:.2f}x")
PY
