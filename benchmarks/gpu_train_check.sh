#!/usr/bin/env bash
# One short check of the trainer on a CUDA machine: single-process training in FP32 and in bf16, and torchrun DDP
# (NCCL), all on generated scenes (no ../shared data needed), each bounded by --max-minutes.
#
#   bash benchmarks/gpu_train_check.sh SCENES_DIR [steps]
#
# SCENES_DIR holds scene folders (`sarloc synth --out DIR/synth_1 --seed 1` ...; generate them where OpenCV is
# installed and carry them if the GPU machine lacks it). Writes $OUT/train_single, $OUT/train_single_bf16 and
# $OUT/train_ddp (run folders without the weights) and prints steps/s. The repository root goes on PYTHONPATH:
# no install needed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SCENES="${1:?usage: gpu_train_check.sh SCENES_DIR [steps]}"
STEPS="${2:-300}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export OUT="${OUT:-runs/gpu}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count())"
WORK="$(mktemp -d)"
common=(train --scenes "$SCENES" --preset quick --steps "$STEPS" --from-scratch --max-minutes 3 --no-progress)
rc=0
echo "== single process"
t0=$SECONDS
timeout 240 "$PY" -m sarloc.cli "${common[@]}" --out "$WORK/single" || rc=$?
echo "single: exit $rc, $((SECONDS - t0)) s wall"
# bf16 autocast (--precision bf16): for GPUs with native bfloat16 (A100, H100/H200 class), where the convolutions
# run on tensor cores; compare its steps/s and final loss with the FP32 run above (FP32 stays the reference)
echo "== single process, --precision bf16"
t0=$SECONDS
rc3=0
timeout 240 "$PY" -m sarloc.cli "${common[@]}" --precision bf16 --out "$WORK/single_bf16" || rc3=$?
echo "single bf16: exit $rc3, $((SECONDS - t0)) s wall"
echo "== torchrun DDP, 1 process per GPU"
t0=$SECONDS
rc2=0
timeout 240 "$PY" -m torch.distributed.run --standalone --nproc_per_node="$("$PY" -c 'import torch; print(max(1, torch.cuda.device_count()))')" \
  -m sarloc.cli "${common[@]}" --out "$WORK/ddp" || rc2=$?
echo "ddp: exit $rc2, $((SECONDS - t0)) s wall"
for r in single single_bf16 ddp; do
  mkdir -p "$OUT/train_$r"
  find "$WORK/$r" -maxdepth 1 -type f ! -name '*.pt' -exec cp {} "$OUT/train_$r/" \; 2>/dev/null || true
done
exit $(( rc || rc2 || rc3 ))
