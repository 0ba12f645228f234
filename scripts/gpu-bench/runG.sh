# Issue 8 (memory truth), part 1: default settings (idle footprint, first request after the cache release, a
# co-host that leaves the live free memory binding) and the 24 GiB budget, through `bench --cohost` over HTTP.
# part 2 (runH.sh): the 16, 12 and 8 GiB budgets. WHEELS: diffusers, pydantic(-core, -settings), annotated-types,
# typing-inspection, python-dotenv, fastapi, starlette, uvicorn, isal.
source "$(dirname "$0")/common.sh"
nvidia-smi --query-gpu=memory.total,memory.used --format=csv
T 240 $B --synthetic --cohost 100 --out $R/cohost_default.json > $R/cohost_default.log 2>&1; tail -3 $R/cohost_default.log
T 200 $B --synthetic --cohost 110 --vram-budget-gb 24 --out $R/cohost_b24.json > $R/cohost_b24.log 2>&1; tail -3 $R/cohost_b24.log
python3 - <<'PY'
import json, glob
for f in sorted(glob.glob("/tmp/r/cohost_*.json")):
    r = json.load(open(f)); print(f, json.dumps(r.get("verdict")), "start", r.get("start"), "sweep", {k: v for k, v in r.get("sweep", {}).items() if k != "rows"})
PY
pack
