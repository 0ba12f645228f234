# Sourced by scripts/serve and scripts/test: make .venv and install zimage-ui into it, once per change of
# pyproject.toml or constraints.txt (the versions last tested: two fresh machines get the same ones).
# TORCH_SPEC picks the torch build (default: a CPU-friendly pin without a GPU, the newest 2.x with one).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
say() { echo "zimage-ui setup: $*" >&2; }
extras=${1:-}
stamp=".venv/.zimage-ui-installed${extras:+-$extras}"
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  started=$SECONDS
  if [ ! -x .venv/bin/python ]; then
    say "creating .venv with $("$PY" --version 2>&1) (first run)"
    "$PY" -m venv .venv
  fi
  say "installing zimage-ui${extras:+ with [$extras]} and its dependencies into .venv (first run, or pyproject.toml/constraints.txt changed): a few minutes the first time; pip's progress follows"
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      spec=${TORCH_SPEC:-"torch>=2.6,<3"}
    else
      spec=${TORCH_SPEC:-"torch==2.13.0"}   # no GPU: a plain build (on our machines a local CPU wheel)
    fi
    say "installing $spec (the largest download)"
    .venv/bin/python -m pip install --progress-bar on "$spec"
  fi
  .venv/bin/python -m pip install --progress-bar on -c constraints.txt -e ".${extras:+[$extras]}"
  echo "$want" > "$stamp"
  say "done in $((SECONDS - started)) s"
fi
