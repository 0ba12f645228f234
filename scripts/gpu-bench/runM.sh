# Issue 13 (speed on the path users take), one device command on one H200, as runL.sh with the code after it:
# vanilla diffusers eager and with its one compile line, then ours over HTTP (clients in processes of their own) —
# bf16 on a first start (empty caches, 8 concurrent clients, components), bf16 again as a restart with the on-disk
# caches (the attention probe's answer is one of them now), then fp8 (latents/PSNR vs bf16 over 8 seeds).
source "$(dirname "$0")/common.sh"
nproc; free -g | head -2
T 80 python3 "$VANILLA" --reps 5 > $R/vanilla.jsonl; cat $R/vanilla.jsonl
T 110 python3 "$VANILLA" --reps 5 --compile > $R/vanilla_compile.jsonl; cat $R/vanilla_compile.jsonl
L="--synthetic --compile-vae --http --baseline $R/vanilla_compile.jsonl"
T 230 $B $L --runs 5 --concurrency 8 --components --latents $R/latents_bf16.pt --out $R/bf16.json 2> $R/bf16.log; tail -3 $R/bf16.log
T 100 $B $L --runs 3 --quick --out $R/bf16_restart.json 2> $R/bf16_restart.log; tail -3 $R/bf16_restart.log
T 190 $B $L --fp8 --runs 5 --quick --latents $R/latents_bf16.pt --out $R/fp8.json 2> $R/fp8.log; tail -3 $R/fp8.log
python3 scripts/gpu-bench/issue13_summary.py $R | tee $R/summary.txt
rm -f $R/latents_bf16.pt
pack; cp $R/summary.txt $R/*.json "$OUT"/ 2>/dev/null; ls "$OUT"
