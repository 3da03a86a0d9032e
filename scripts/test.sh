#!/usr/bin/env bash
# The test suite. Sets up .venv first when no environment is active. Real-scene tests read ../shared/data
# and skip with a message without it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  bash scripts/setup.sh .venv
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
python -m pytest -q -p no:cacheprovider "$@" tests
