# Sourced by scripts/serve and scripts/test: make .venv and install zimage-ui into it, once per pyproject change.
# TORCH_SPEC picks the torch build (default: a CPU-friendly pin without a GPU, the newest 2.x with one).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
extras=${1:-}
stamp=".venv/.zimage-ui-installed${extras:+-$extras}"
want=$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      spec=${TORCH_SPEC:-"torch>=2.6,<3"}
    else
      spec=${TORCH_SPEC:-"torch==2.13.0"}   # no GPU: a plain build (on our machines a local CPU wheel)
    fi
    .venv/bin/python -m pip install -q "$spec"
  fi
  .venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
  echo "$want" > "$stamp"
fi
