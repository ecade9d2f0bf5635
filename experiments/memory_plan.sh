#!/bin/bash
# Regenerates results/memory_plan.txt: every plan_memory configuration the README's
# "Model scale" tables quote (XLA:CPU estimates; about 10 minutes on 2 CPU cores).
#   bash experiments/memory_plan.sh          # from the repository root, with the project installed
set -euo pipefail
PY=${PYTHON:-python}
out=results/memory_plan.txt.tmp
trap 'rm -f "$out"' EXIT
{
echo "# experiments/plan_memory.py output (XLA:CPU estimates, 2-core CPU, fake devices); each section names its command"
run() { echo; echo "## $1"; shift; echo "\$ python experiments/plan_memory.py $*"; "$PY" experiments/plan_memory.py "$@" 2>&1 | grep -v -i "warn\|rematerialization"; }
run depth --preset tiny --n-layers 2,8,32 --mesh 1,8,1 --seq 64 --batch 8
run depth_remat --preset tiny --n-layers 8,32 --mesh 1,8,1 --seq 64 --batch 8 --remat full
for p in llama2_7b llama3_8b; do
  run "${p}_full_f32" --preset $p --mesh 1,8,1 --seq 4096 --batch 8 --remat full --layouts scan
  run "${p}_full_bf16_master" --preset $p --mesh 1,8,1 --seq 4096 --batch 8 --remat full --layouts scan --param-dtype bfloat16 --master-weights
  run "${p}_lora16_bf16" --preset $p --mesh 1,8,1 --seq 4096 --batch 8 --remat full --layouts scan --param-dtype bfloat16 --lora-rank 16
done
run llama3_8b_full_f32_loop --preset llama3_8b --mesh 1,8,1 --seq 4096 --batch 8 --remat full --layouts loop
} > "$out"
mv "$out" results/memory_plan.txt
