# Issue 13 (speed on the path users take), one device command on one H200: vanilla diffusers eager and with its one
# compile line, then ours over HTTP — bf16 (first start, empty caches), fp8 (latents/PSNR vs bf16 over 8 seeds),
# bf16 again (restart with the on-disk caches: cold start). EXTRA_WHEELS: torchao for fp8 (not on the image).
# As run (docs/benchmarks.md, section 6) the code also compiled the text encoder's layers, encoded the next queued
# prompt during a denoise and wrote PNGs at ISA-L level 3; all three changed after this run.
source "$(dirname "$0")/common.sh"
[ -n "${EXTRA_WHEELS:-}" ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$EXTRA_WHEELS"/*.whl
nproc; free -g | head -2
T 80 python3 "$VANILLA" --reps 5 > $R/vanilla.jsonl; cat $R/vanilla.jsonl
T 110 python3 "$VANILLA" --reps 5 --compile > $R/vanilla_compile.jsonl; cat $R/vanilla_compile.jsonl
L="--synthetic --compile-vae --http --baseline $R/vanilla_compile.jsonl"
T 230 $B $L --runs 5 --concurrency 8 --components --latents $R/latents_bf16.pt --out $R/bf16.json 2> $R/bf16.log; tail -3 $R/bf16.log
T 190 $B $L --fp8 --runs 5 --quick --latents $R/latents_bf16.pt --out $R/fp8.json 2> $R/fp8.log; tail -3 $R/fp8.log
T 100 $B $L --runs 3 --quick --out $R/bf16_restart.json 2> $R/bf16_restart.log; tail -3 $R/bf16_restart.log
python3 scripts/gpu-bench/issue13_summary.py $R | tee $R/summary.txt
rm -f $R/latents_bf16.pt
pack; cp $R/summary.txt $R/*.json "$OUT"/ 2>/dev/null; ls "$OUT"
