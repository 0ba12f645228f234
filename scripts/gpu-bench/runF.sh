# Not yet run (written 2026-12-01, when this work's device time was spent): the measurements issue 4 still lacks,
# in one device command. WHEELS must also hold the service's wheels (fastapi, starlette, uvicorn, h11, httpx,
# httpcore, anyio, sniffio, idna, certifi, prometheus-client) and isal; gradio is not needed (--http serves no UI).
source "$(dirname "$0")/common.sh"
T 60 python3 "$VANILLA" --reps 5 > $R/vanilla.jsonl; cat $R/vanilla.jsonl
# bf16 compiled: engine path and HTTP path against vanilla; the warm-up now runs on the worker thread, so
# first_request.ratio answers whether that closed the first-request gap
T 200 $B --synthetic --runs 5 --http --components --baseline $R/vanilla.jsonl --latents $R/latents_bf16.pt --out $R/ours.json 2> $R/ours.log
T 150 $B --synthetic --fp8 --runs 5 --http --quick --baseline $R/vanilla.jsonl --latents $R/latents_bf16.pt --out $R/fp8.json 2> $R/fp8.log
# the 500-generation VRAM soak (1 pass each, mixed sizes and batches), eager
T 200 $B --synthetic --no-compile --runs 2 --quick --soak 500 --out $R/soak.json 2> $R/soak.log
grep -h "ready in\|Error" $R/*.log | head
T 100 python3 -m pytest -q -m gpu tests/ui/test_gpu_bar.py -s -p no:cacheprovider --override-ini=addopts= 2>&1 | tail -5
pack
