# Issue 8 (memory truth), part 2: budgets 12 and 8 GiB with a co-host that grabs memory mid-sweep (runG.sh has
# the default settings, 24 and 16 GiB).
source "$(dirname "$0")/common.sh"
for b in 12 8; do
  T 270 $B --synthetic --quick --cohost $((120 - b)) --vram-budget-gb $b --out $R/cohost_b$b.json > $R/cohost_b$b.log 2>&1; tail -2 $R/cohost_b$b.log
done
python3 scripts/gpu-bench/cohost_summary.py $R/cohost_*.json
pack
