#!/usr/bin/env bash
# Set everything up (idempotent) and run the whole test suite, as CI does.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bash "$here/scripts/setup.sh"
cd "$here"
exec "${HDB_VENV:-$here/.venv}/bin/python" -m pytest "$@"
