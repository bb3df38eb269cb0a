#!/usr/bin/env bash
# The checks to run on one accelerator (a GPU) in under 8 minutes, in order
# of importance; every result goes to $OUT (default benchmarks/device_out).
#
#   bash benchmarks/device_check.sh            # on the GPU machine, repo root
#   python benchmarks/summarize.py $OUT/*.json     # markdown rows for RESULTS.md
#
# 1. parity on the tiny fixture with float32 matmuls (TF32 off): verify
#    --train must report every tensor within its target;
# 2. the jax and scipy Hungarian solvers agree (tests/test_hungarian.py);
# 3. the R50 4-scale training step at 2 and 4 images, 800x1344, float32 and
#    bfloat16: step time, images/s, the device's peak memory next to XLA's
#    compiled figure;
# 4. R50 inference at batch 1 and 8, 800x1333: images/s.
# Each step has its own time limit (485 s in all), so one slow step cannot eat the others'.
# Needs nothing beyond jax / flax / optax / numpy / scipy / opencv: the data
# loaders (grain, tensorflow-datasets) are not imported on these paths.
set -u
OUT=${OUT:-benchmarks/device_out}
mkdir -p "$OUT"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/ddq_jax_cache}
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/device_check.log"; }

python3 - <<'EOF' >"$OUT/device.json" 2>>"$OUT/device_check.log"
import json, jax
d = jax.devices()[0]
print(json.dumps(dict(platform=d.platform, device_kind=d.device_kind,
                      devices=jax.device_count(), jax=jax.__version__)))
EOF
log "device: $(cat "$OUT/device.json")"

log "1. tiny parity, float32 matmuls"
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 120 \
  python3 -m ddq_jax verify tests/data/tiny --train \
  >"$OUT/parity_tiny.txt" 2>&1
log "   exit $? ($(grep -c '^ok' "$OUT/parity_tiny.txt") ok, $(grep -c '^FAIL' "$OUT/parity_tiny.txt") FAIL)"

log "2. Hungarian: jax (on the device) against scipy"
# conftest.py defaults to 8 fake CPU devices; set both variables so the
# solver runs on the accelerator.
JAX_PLATFORMS= XLA_FLAGS= timeout 45 python3 -m pytest -q -p no:cacheprovider tests/test_hungarian.py \
  >"$OUT/hungarian.txt" 2>&1
log "   exit $? ($(tail -1 "$OUT/hungarian.txt"))"

bench() {  # name, limit s, benchmark arguments...
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m ddq_jax benchmark --config ddq_r50_4scale \
    --steps 3 --warmup 1 --no-profile --config.loss.hungarian_solver=jax "$@" \
    >"$OUT/$name.json" 2>"$OUT/$name.err"
  log "   $name: exit $? $(tail -c 300 "$OUT/$name.json")"
}
log "3. R50 training step, 800x1344"
bench train_b2_fp32 60 --mode train --batch 2 --size 800 1344
bench train_b4_fp32 60 --mode train --batch 4 --size 800 1344
bench train_b2_bf16 60 --mode train --batch 2 --size 800 1344 \
  --config.train.compute_dtype=bfloat16
bench train_b4_bf16 60 --mode train --batch 4 --size 800 1344 \
  --config.train.compute_dtype=bfloat16
log "4. R50 inference, 800x1333"
bench infer_b1 40 --mode infer --batch 1 --size 800 1333
bench infer_b8 40 --mode infer --batch 8 --size 800 1333
log "done"
