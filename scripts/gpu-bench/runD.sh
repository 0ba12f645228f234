source "$(dirname "$0")/common.sh"
T 60 python3 "$VANILLA" --reps 5 > $R/vanilla.jsonl; cat $R/vanilla.jsonl
T 80 $B --synthetic --save-synthetic /tmp/synth --out $R/save.json 2> $R/save.log
T 80 $B --model /tmp/synth --no-compile --runs 3 --quick --baseline $R/vanilla.jsonl --out $R/disk_first.json 2> $R/disk_first.log
T 120 $B --model /tmp/synth --no-compile --runs 3 --quick --soak 100 --baseline $R/vanilla.jsonl --out $R/disk_restart.json 2> $R/disk_restart.log
T 130 $B --model /tmp/synth --runs 3 --quick --baseline $R/vanilla.jsonl --out $R/disk_compiled_first.json 2> $R/disk_compiled_first.log
T 90 $B --model /tmp/synth --runs 3 --quick --baseline $R/vanilla.jsonl --out $R/disk_compiled_restart.json 2> $R/disk_compiled_restart.log
grep -h "ready in" $R/*.log
pack
