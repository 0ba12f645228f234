source "$(dirname "$0")/common.sh"
T 60 python3 "$VANILLA" --reps 5 > $R/vanilla.jsonl; cat $R/vanilla.jsonl
T 230 $B --synthetic --runs 5 --baseline $R/vanilla.jsonl --sweep --components --latents $R/latents_bf16.pt --out $R/ours.json 2> $R/ours.log
grep -E "ready in|Error" $R/ours.log | head -3
T 150 $B --synthetic --fp8 --runs 3 --quick --baseline $R/vanilla.jsonl --latents $R/latents_bf16.pt --out $R/fp8.json 2> $R/fp8.log
grep -E "ready in|Error|error" $R/fp8.log | head -5
T 90 $B --synthetic --no-compile --runs 3 --quick --soak 100 --baseline $R/vanilla.jsonl --out $R/nocompile.json 2> $R/nocompile.log
grep -E "ready in|Error" $R/nocompile.log | head -3
T 100 $B --synthetic --save-synthetic /tmp/synth --out $R/save.json 2> $R/save.log
sync; du -sh /tmp/synth
T 80 $B --model /tmp/synth --no-compile --runs 2 --quick --baseline $R/vanilla.jsonl --out $R/fromdisk.json 2> $R/fromdisk.log
grep -E "ready in|Error" $R/fromdisk.log | head -3
pack
