# Issue 12: train the demo model on the GPU machine (one H200) and judge it on the 200 held-out prompts.
# Run from the folder that holds zimage_ui/ (CODE), with WHEELS = the wheels the machine lacks (diffusers ...).
#   BUDGET  train-demo's --time-budget-s (render + VAE + transformer + evaluation reserve)
#   EXTRA   more train-demo flags (the shipped run: --init zimage_ui/models/demo_weights/demo.safetensors --distill-guidance 3 --dit-lr 0.0002 --eval-reserve-s 30)
#   OUT     where the results go: results.tgz (log, loss curves, sample sheets) and the weights in 15 MB parts
set -u
cd "${CODE:-.}" || exit 1
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
OUT=${OUT:-$PWD/train-out}; mkdir -p "$OUT"
R=/tmp/demo-train; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
timeout $((${BUDGET:-450} + 100)) python3 -m zimage_ui.cli train-demo --out $R --time-budget-s "${BUDGET:-450}" \
  --workers 14 --compile ${EXTRA:-} 2>&1 | tee $R/train.log
if [ -f $R/demo.safetensors ]; then
  (cd $R && sha256sum demo.safetensors > "$OUT/demo.sha256" && split -b 15000000 demo.safetensors "$OUT/demo.safetensors.part-")
  mv $R/demo.safetensors /tmp/
fi
tar czf "$OUT/results.tgz" -C $R .
ls -la "$OUT"
