#!/usr/bin/env bash
# One short GPU check of sarloc (encoder latency/parity in PyTorch CUDA, brute-force search on the GPU).
#
#   bash benchmarks/gpu_check.sh [gpu_check.py args, e.g. --checkpoint ckpt.pt]
#
# Writes $OUT/gpu_check.json (OUT defaults to runs/gpu) and prints markdown tables; about 1-2 minutes on an H100,
# hard limit 400 s. PYTHON picks the interpreter; the repository root is put on PYTHONPATH so sarloc needs no
# install on a bare machine.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export OUT="${OUT:-runs/gpu}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

echo "== nvidia-smi -L"
nvidia-smi -L || echo "nvidia-smi not available"
echo "== versions"
"$PY" - <<'PYEOF'
import platform

import torch

print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA (torch build) {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, CUDA available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"device 0: {torch.cuda.get_device_name(0)}")
PYEOF

echo "== gpu_check.py $*"
rc=0
timeout 400 "$PY" benchmarks/gpu_check.py "$@" || rc=$?
echo "gpu_check.py exit status $rc (0 = all checks passed, 1 = a check failed, 124 = timed out); see $OUT/gpu_check.json"
exit "$rc"
