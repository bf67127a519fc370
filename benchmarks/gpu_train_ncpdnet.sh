#!/usr/bin/env bash
# One GPU lease: retrain the MRF NC-PDNet (issue 16) within a fixed budget of seconds, CPU workers simulating the
# data while the GPU trains. Usage (device tool, from the repository root; carry `.whl` with the finufft wheel for
# the device's Python and `.gpu/basis.npy`, the dictionary basis written by `mrf_basis`):
#   bash benchmarks/gpu_train_ncpdnet.sh 420        # results under $OUT (or ./gpu-results)
# Environment overrides for a dry run on a CPU machine: DEVICE=cpu POOL=2 WORKERS=2 BATCH=2.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
BUDGET="${1:-420}"
DEVICE="${DEVICE:-cuda}" POOL="${POOL:-96}" WORKERS="${WORKERS:-14}" BATCH="${BATCH:-8}"
t0=$(date +%s)
if [ -d .whl ] && ! python3 -c "import finufft" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch, finufft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'finufft', finufft.__version__)"
  echo "cpus $(nproc --all)"
} 2>&1 | tee "$OUT/device.txt"
# 1. The CUDA EPG test (skipped on CPU machines).
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/unit/test_epg.py -k cuda 2>&1 | tail -3 | tee "$OUT/cuda_tests.txt"
# 2. NC-PDNet's residual operator on the device: per-slice Toeplitz loop against batched_normal (B 8, K 10, 8 coils).
timeout 120 python3 - "$DEVICE" <<'PY' 2>&1 | tee "$OUT/normal_bench.txt"
import sys, time, numpy as np, torch
from pipelines.recon.ncpdnet import with_maps
from pipelines.recon.operators import SubspaceChannels
from pipelines.recon.subspace import batched_normal
from pipelines.recon.train_ncpdnet import mrf_slice_operator, mrf_spiral_samples
dev = torch.device(sys.argv[1])
basis = torch.from_numpy(np.load(".gpu/basis.npy")[:, :10])
for n in (64,):
    k, frame = mrf_spiral_samples(1000, n)
    op = mrf_slice_operator(k, frame, np.ones((8, n, n), np.complex64), basis).to(dev)
    op.kernels(); op.full_kernels()
    ops = [with_maps(op, torch.randn(8, n, n, dtype=torch.complex64)) for _ in range(8)]
    c = torch.randn(8, 10, n, n, dtype=torch.complex64, device=dev)
    for name, fn in (("loop", lambda: torch.stack([o.normal(x) for o, x in zip(ops, c)])), ("batched", lambda: batched_normal(ops, c))):
        fn()
        if dev.type == "cuda": torch.cuda.synchronize()
        t = time.perf_counter(); reps = 5
        for _ in range(reps): out = fn()
        if dev.type == "cuda": torch.cuda.synchronize()
        print(f"{n}^2, batch 8, K 10, 8 coils, {name}: {(time.perf_counter() - t) / reps * 1e3:.1f} ms per A^H D A")
    ref = torch.stack([o.normal(x) for o, x in zip(ops, c)])
    print(f"  relative difference {float((batched_normal(ops, c) - ref).norm() / ref.norm()):.2e}")
PY
# 3. Training: the budget counts from the trainer's start (pool simulation included).
left=$(( BUDGET - ($(date +%s) - t0) ))
common=(--task mrf --device "$DEVICE" --basis .gpu/basis.npy --out "$OUT/ncpdnet_mrf.safetensors" --val 3
        --workers "$WORKERS" --buffer 3000 --batch-size "$BATCH" --steps 100000 --schedule cosine --lr 1e-3
        --val-every 500 --checkpoint-every 250 --threads 2 --no-progress --seed 16)
timeout $(( left + 60 )) python3 -m pipelines.recon.train_ncpdnet "${common[@]}" --run-dir run --pool "$POOL" \
  --time-limit "$left" 2>&1 | grep -v "UserWarning\|^  " | tee "$OUT/train.txt"
if [ ! -f "$OUT/ncpdnet_mrf.safetensors" ] && [ ! -f run/checkpoint.pt ]; then
  # The pool could not be simulated on the GPU: once more with the pool on the CPU (fewer phantoms).
  left=$(( BUDGET - ($(date +%s) - t0) ))
  echo "retrying with the pool on the CPU, ${left} s left" | tee -a "$OUT/train.txt"
  timeout $(( left + 60 )) python3 -m pipelines.recon.train_ncpdnet "${common[@]}" --run-dir run2 --pool 32 \
    --pool-device cpu --threads 16 --time-limit "$left" 2>&1 | grep -v "UserWarning\|^  " | tee -a "$OUT/train.txt"
fi
for d in run run2; do
  if [ ! -f "$OUT/ncpdnet_mrf.safetensors" ] && [ -f "$d/checkpoint.pt" ]; then  # killed mid-run: keep its last checkpoint
    python3 -m pipelines.recon.train_ncpdnet "${common[@]}" --run-dir "$d" --export 2>&1 | tail -2 | tee -a "$OUT/train.txt"
  fi
  [ -f "$d/history.json" ] && cp "$d/history.json" "$OUT/history_$d.json"
done
ls -la "$OUT"
