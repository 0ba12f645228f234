# Issue 8 (memory truth), part 1: default settings (idle footprint, first request after the cache release paired
# with an idle of the same length that kept the cache, a co-host that leaves the live free memory binding), the
# 24 GiB and 16 GiB budgets, through `bench --cohost` over HTTP. Part 2 (runH.sh): 12 and 8 GiB.
# WHEELS: diffusers, pydantic(-core, -settings), annotated-types, typing-inspection, python-dotenv, fastapi,
# starlette, uvicorn, isal, opentelemetry-api, importlib_metadata.
source "$(dirname "$0")/common.sh"
T 200 $B --synthetic --cohost 100 --out $R/cohost_default.json > $R/cohost_default.log 2>&1; tail -2 $R/cohost_default.log
T 150 $B --synthetic --quick --cohost 110 --vram-budget-gb 24 --out $R/cohost_b24.json > $R/cohost_b24.log 2>&1; tail -2 $R/cohost_b24.log
T 180 $B --synthetic --quick --cohost 104 --vram-budget-gb 16 --out $R/cohost_b16.json > $R/cohost_b16.log 2>&1; tail -2 $R/cohost_b16.log
python3 scripts/gpu-bench/cohost_summary.py $R/cohost_*.json
pack
