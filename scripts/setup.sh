#!/usr/bin/env bash
# Create a virtual environment with sarloc and everything its tests and CPU training need.
# torch is pinned to the CPU wheel (an unpinned torch pulls a multi-GB CUDA build).
set -euo pipefail
VENV="${1:-.venv}"
cd "$(dirname "$0")/.."
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
# already set up from the same dependency files: nothing to install (delete $VENV/.sarloc-setup to force it)
STAMP="$VENV/.sarloc-setup"
WANT="$(cat pyproject.toml scripts/constraints-dev.txt scripts/setup.sh sarloc/_scan.c | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && python -c "import sarloc, torch, onnxruntime" 2>/dev/null; then
  echo "$VENV is set up (delete $STAMP to reinstall)"
  exit 0
fi
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[train,cpu,geo,dev]" -c scripts/constraints-dev.txt
python -c "import sarloc, torch, onnxruntime; print('sarloc', sarloc.__version__, 'torch', torch.__version__)"
# the map-pack scan kernel (sarloc/_scan.c) is optional: say which one this machine got
python -c "from sarloc.mappack.search import BlockScorer; print('map-pack scan kernel:', BlockScorer(8).kernel)"
echo "$WANT" > "$STAMP"
