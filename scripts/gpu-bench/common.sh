# Sourced by the run scripts beside it (the programmes behind docs/benchmarks.md, as they ran on the GPU machine).
#   WHEELS   folder of wheels the machine lacks (diffusers 0.42.1, pydantic, pydantic-settings, torchao, fastapi,
#            starlette, uvicorn, isal, opentelemetry-api (fastapi >= 0.16x imports it), ...);
#            empty = install nothing
#   VANILLA  path of ../shared/bench/vanilla_diffusers.py (never copied into the project)
#   DEADLINE seconds after which no further step starts (each step is also cut at its own timeout)
#   OUT      where results.tgz goes (default: ./bench-out)
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 ZIMAGE_UI_CACHE_DIR=/tmp/zc TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
VANILLA=${VANILLA:?set VANILLA to the path of vanilla_diffusers.py}
OUT=${OUT:-$PWD/bench-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm --format=csv
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name())"
B="python3 -m zimage_ui.cli bench"
R=/tmp/r; mkdir -p $R
DEADLINE=${DEADLINE:-570}
# T SECONDS CMD...: run with a timeout, never past DEADLINE seconds since the script started
T() { local t=$1; shift; local left=$((DEADLINE - SECONDS)); [ $left -lt 15 ] && { echo "=== skipped (deadline): $*"; return; }
      [ $t -gt $left ] && t=$left; echo "=== $(date +%T) [t=$t] $*"; local s=$SECONDS; timeout "$t" "$@"; echo "=== rc $? in $((SECONDS-s)) s"; }
pack() { tar czf "$OUT/results.tgz" -C $R . ; ls -la $R; }
