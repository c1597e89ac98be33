#!/usr/bin/env bash
# Set everything up (idempotent) and start ComfyUI with this pack on http://127.0.0.1:8188 (CPU unless a GPU is there).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bash "$here/scripts/setup.sh"
comfy="${COMFYUI_PATH:-$here/.comfyui}"
cd "$comfy"
extra=()
"$here/.venv/bin/python" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
  || extra+=(--cpu --use-pytorch-cross-attention)
exec "${HDB_VENV:-$here/.venv}/bin/python" main.py --listen 127.0.0.1 --port "${PORT:-8188}" --disable-auto-launch "${extra[@]}" "$@"
