# Issue 8 (memory truth), part 2: budgets 16, 12 and 8 GiB with a co-host that grabs memory mid-sweep (runG.sh has
# the default settings and 24 GiB). --quick skips the first-request-after-release timing (measured in runG).
source "$(dirname "$0")/common.sh"
for b in 16 12 8; do
  T 200 $B --synthetic --quick --cohost $((120 - b)) --vram-budget-gb $b --out $R/cohost_b$b.json > $R/cohost_b$b.log 2>&1; tail -3 $R/cohost_b$b.log
done
python3 - <<'PY'
import json, glob
for f in sorted(glob.glob("/tmp/r/cohost_*.json")):
    r = json.load(open(f)); print(f, json.dumps(r.get("verdict")), "start", r.get("start"), "sweep", {k: v for k, v in r.get("sweep", {}).items() if k != "rows"})
PY
pack
