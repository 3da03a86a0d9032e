#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then run `sarloc demo` (CPU, no ../shared needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh .venv
# shellcheck disable=SC1091
source .venv/bin/activate
sarloc demo "$@"
