source "$(dirname "$0")/common.sh"
T 120 python3 "$VANILLA" --reps 5 > $R/vanilla.jsonl; cat $R/vanilla.jsonl
T 300 $B --synthetic --runs 5 --baseline $R/vanilla.jsonl --sweep --idle-test --latents $R/latents_bf16.pt --out $R/ours_bf16.json 2> $R/ours_bf16.log
tail -5 $R/ours_bf16.log
T 110 $B --synthetic --runs 3 --baseline $R/vanilla.jsonl --out $R/ours_restart.json 2> $R/ours_restart.log
tail -3 $R/ours_restart.log
T 60 python3 "$VANILLA" --reps 5 --compile > $R/vanilla_compile.jsonl; cat $R/vanilla_compile.jsonl
pack
