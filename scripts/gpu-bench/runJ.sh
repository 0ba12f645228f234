# Issue 8: the 12 GiB budget again, alone. In runI it loaded the fp8-storage calibration that the 16 GiB run's
# fallback test had saved while it was deliberately fooled (fixed: the bench saves the true one back).
source "$(dirname "$0")/common.sh"
# run K (the clean 12 GiB figure): a cache dir of its own. Run J was CACHE=/tmp/zc right after runI.sh on the same
# machine, so it loaded runI's calibration files (the poisoned one and the needs learned from its OOMs).
export ZIMAGE_UI_CACHE_DIR=${CACHE:-/tmp/zc-clean}
T 200 $B --synthetic --quick --cohost 100 --vram-budget-gb 12 --out $R/cohost_b12.json > $R/cohost_b12.log 2>&1; tail -2 $R/cohost_b12.log
python3 scripts/gpu-bench/cohost_summary.py $R/cohost_*.json
pack
