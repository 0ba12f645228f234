# Issue 8 (memory truth) after the fixes: budgets 16, 12 and 8 GiB with a co-host grabbing 100 GiB mid-sweep
# (the 16 GiB run also times a real decode OOM's fallback). Issue 12: the demo model trains at the same time, in
# the background (a second co-host: admission sees its memory live). Weights come back split in 15 MB parts.
source "$(dirname "$0")/common.sh"
mkdir -p $R/demo-train
(cd .devbench/demo && setsid nohup python3 -m zimage_ui.cli train-demo --out $R/demo-train --time-budget-s 330 --workers 8 > $R/train.log 2>&1 &)
for b in 16 12 8; do
  T 200 $B --synthetic --quick --cohost 100 --vram-budget-gb $b --out $R/cohost_b$b.json > $R/cohost_b$b.log 2>&1; tail -2 $R/cohost_b$b.log
done
python3 scripts/gpu-bench/cohost_summary.py $R/cohost_*.json
while [ ! -f $R/demo-train/train_log.json ] && [ $SECONDS -lt 575 ]; do sleep 5; done; sleep 3
tail -5 $R/train.log
[ -f $R/demo-train/demo.safetensors ] && (cd $R/demo-train && split -b 15000000 demo.safetensors "$OUT/demo.safetensors.part-" && sha256sum demo.safetensors > "$OUT/demo.sha256" && mv demo.safetensors /tmp/)
pack
