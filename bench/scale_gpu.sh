#!/usr/bin/env bash
# The GPU run of issue 15 (docs/scale.md), prepared to fit a ~12-minute device budget on one H100/H200-class GPU:
# sd15-shape at 512 px, bf16 weights (dtype auto), results in $OUT (or bench/out) as JSON + logs.
#   bash bench/scale_gpu.sh            # needs: the venv on PATH as `python`, one CUDA device
# Each step is capped with `timeout` so one slow step cannot eat the whole budget; later steps still run.
set -u
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
PY=${PY:-python}
B="$PY bench/bench_scale.py --device cuda --resolution 512"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
run() {  # name, seconds, args...
  local name=$1 secs=$2; shift 2
  echo "== $name ($(date -u +%T))"
  timeout "$secs" $B "$@" --out "$OUT/scale_$name.json" > "$OUT/scale_$name.log" 2>&1
  echo "rc=$?"; tail -n 3 "$OUT/scale_$name.log"
}
# 1. training-free throughput target: >= 3 images/s at 50 steps with CFG (batch 8, warm-up first)
run cfg 150 --rows cfg --gen-steps 50 --batch 8 --warmup --channels-last --inference-mode
# 2. the same with torch.compile (off by default until this pays): compile time is inside the warm-up
run cfg_compile 240 --rows cfg --gen-steps 50 --batch 8 --warmup --channels-last --inference-mode --compile
# 3. every method: training step (paper preset: APO batch 4; O2MAG AGO) and generation at 50 steps, batch 8;
#    projected_fit_s = preset steps x step time (target: APO adapter <= 5 min per defect type); peaks <= 24 GB
run methods 300 --rows methods --train-steps 5 --gen-steps 50 --batch 8 --channels-last
# 4. O2MAG's branch cache at full scale (bytes, time saved per extra target batch), and without query
#    chunking of the explicit attention path (the memory the chunking saves; may run out of memory)
run o2mag_cache 120 --rows o2mag-cache --gen-steps 50 --batch 8
run o2mag_nochunk 120 --rows o2mag-cache --gen-steps 50 --batch 8 --attn-chunk-mb 1000000
