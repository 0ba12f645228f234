source "$(dirname "$0")/common.sh"
T 60 python3 "$VANILLA" --reps 5 > $R/vanilla.jsonl; cat $R/vanilla.jsonl
T 70 $B --synthetic --save-synthetic /tmp/synth --out $R/save.json 2> $R/save.log
T 110 $B --model /tmp/synth --runs 3 --quick --baseline $R/vanilla.jsonl --out $R/c_first.json 2> $R/c_first.log
T 80 $B --model /tmp/synth --runs 3 --quick --baseline $R/vanilla.jsonl --out $R/c_restart.json 2> $R/c_restart.log
T 60 $B --model /tmp/synth --no-compile --runs 3 --quick --baseline $R/vanilla.jsonl --out $R/e_restart.json 2> $R/e_restart.log
grep -h "ready in" $R/*.log
pack
