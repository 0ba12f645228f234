source "$(dirname "$0")/common.sh"
T 60 python3 "$VANILLA" --reps 5 > $R/vanilla.jsonl; cat $R/vanilla.jsonl
T 220 $B --synthetic --runs 5 --baseline $R/vanilla.jsonl --sweep --idle-test --latents $R/latents_bf16.pt --out $R/ours.json 2> $R/ours.log
tail -12 $R/ours.log | grep -v "^bench:"
for gb in 24 16 12 8; do
  T 100 $B --synthetic --runs 2 --quick --vram-budget-gb $gb --baseline $R/vanilla.jsonl --out $R/budget$gb.json 2> $R/budget$gb.log
  grep -E "plan: →|ready in|Error|error" $R/budget$gb.log | head -5
done
T 90 $B --synthetic --runs 3 --quick --baseline $R/vanilla.jsonl --out $R/restart.json 2> $R/restart.log
grep -E "ready in" $R/restart.log
pack
