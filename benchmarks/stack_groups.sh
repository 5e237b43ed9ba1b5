#!/usr/bin/env bash
# Every bundled failure group edited one after another in ONE workspace through the CLI, as a user
# would (locate --on-top, apply --on-top, 10 edit images each, the default local editor), then the
# stacked model exported to ONNX and scored with onnxruntime on all in-distribution test images and on
# all 10,000 Fashion-MNIST test images (preprocessing from the ONNX metadata only).
#   python -m vitedit.zoo.fashion test-images --work build/fashion
#   python -m vitedit.zoo.fashion all-test-images --work build/fashion
#   OMP_NUM_THREADS=1 bash benchmarks/stack_groups.sh build/stack [plain|local] [SPARSITY] [APPLY FLAGS...]
#   STACK_ORDER=reverse ... edits the groups in the reverse order (the stack should not depend on it)
# (extra flags go to every `apply --on-top`, e.g. --anchor-weight 10 --disjoint)
set -euo pipefail
out=${1:-build/stack}; objective=${2:-local}; sparsity=${3:-0.05}
extra=("${@:4}")
root=$(cd "$(dirname "$0")/.." && pwd)
vitedit() { "$root/.venv/bin/vitedit" "$@"; }
mkdir -p "$out"; cd "$out"
rm -rf ws failures
groups=$(vitedit examples --json | "$root/.venv/bin/python" -c "import json,sys; print(' '.join(g['group'] for g in json.load(sys.stdin)['groups'] if g['failures'] > 10))")
[ "${STACK_ORDER:-}" = reverse ] && groups=$(echo $groups | tr ' ' '\n' | tac | tr '\n' ' ')
echo "order: $groups"
first=1
for g in $groups; do
  cp -r "$root/vitedit/assets/fashion/failures/$g" "failures-$g"
  if [ $first = 1 ]; then on=(); first=0; else on=(--on-top ${extra[@]+"${extra[@]}"}); fi
  vitedit locate "failures-$g" -w ws --edit-images 10 ${on[@]+"${on[0]}"} -q > /dev/null
  vitedit apply -w ws --objective "$objective" --sparsity "$sparsity" ${on[@]+"${on[@]}"} --json > "apply-$g.json"
  "$root/.venv/bin/python" -c "import json; r=json.load(open('apply-$g.json')); c=r['cumulative']; print('$g', 'edit', r['history_index'], 'gen', round(r['generalization'],3), 'stack drop', c.get('accuracy_drop'), 'flips', c.get('flip_rate'), 'retained', [i['retained'] for i in r['interference']])"
done
vitedit history -w ws
vitedit export stacked.onnx -w ws -q
vitedit export base.onnx -w ws --base -q
"$root/.venv/bin/python" "$root/benchmarks/score_onnx.py" stacked.onnx "$root/build/fashion/test-images" --base base.onnx
"$root/.venv/bin/python" "$root/benchmarks/score_onnx.py" stacked.onnx "$root/build/fashion/all-test-images" --base base.onnx --per-class
