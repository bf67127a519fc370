#!/usr/bin/env bash
# One run on a GPU machine (H100/H200) covers the CUDA tests and the end-to-end clinical benchmark, in under
# 8 minutes. Usage (device tool, from the repository root, with .venv carried):
#   bash benchmarks/gpu_check.sh            # results under $OUT (or ./gpu-results)
# It installs nothing beyond a CUDA build of torch when the venv has the CPU wheel (the device has no internet
# beyond the package registries it was given; set SKIP_TORCH_INSTALL=1 to keep the venv's torch).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
. .venv/bin/activate 2>/dev/null || true
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
} | tee "$OUT/device.txt"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "CUDA is not available to torch: install a CUDA build of torch in .venv first" | tee -a "$OUT/device.txt"; exit 1; }
python -c "import cufinufft" 2>/dev/null || pip install -q cufinufft || echo "cufinufft unavailable: NUFFT falls back to the CPU" | tee -a "$OUT/device.txt"
# 1. CUDA tests (skipped on CPU machines), ~1 min.
timeout 180 python -m pytest -q -k "cuda or gpu" tests 2>&1 | tail -20 | tee "$OUT/cuda_tests.txt" || true
# 2. Matching on the GPU against the CPU, default dictionary (built on the GPU: the EPG is batched torch).
timeout 240 python - <<'PY' 2>&1 | tee "$OUT/matching_gpu.txt"
import time, torch, numpy as np
from pipelines.physics.sequences import get_sequence
from pipelines.mapping.dictionary import build_dictionary, fisp_spec
from pipelines.mapping.matching import match
from pipelines.physics.epg import epg_fisp
seq = get_sequence("fisp")
t = time.time(); d = build_dictionary(seq, fisp_spec(), device="cuda", cache_dir="gpu-cache"); torch.cuda.synchronize()
print(f"dictionary on cuda: {time.time() - t:.1f} s, {d.n_atoms} atoms")
rng = np.random.default_rng(0); n = 65536
t1 = np.exp(rng.uniform(np.log(300), np.log(4000), n)); t2 = np.exp(rng.uniform(np.log(20), np.log(np.minimum(t1, 1500)), n))
x = epg_fisp(seq, torch.tensor(t1, dtype=torch.float32, device="cuda"), torch.tensor(t2, dtype=torch.float32, device="cuda"),
             torch.tensor(rng.uniform(0.8, 1.2, n), dtype=torch.float32, device="cuda"))
c = x @ d.complex.basis[:, :8]
for search in ("fast", "exhaustive"):
    torch.cuda.synchronize(); t = time.time(); r = match(c, d, coefficients=True, search=search); torch.cuda.synchronize()
    print(f"match rank 8, {n} voxels, {search}: {time.time() - t:.2f} s")
PY
# 3. The clinical study end to end (10 x 256^2, 16 coils) on cuda, warm cache; ~3 min.
timeout 420 python benchmarks/clinical_study.py --slices 10 --work gpu-work --cache gpu-cache \
  --set recon=cgsense 2>&1 | tee "$OUT/clinical_study_gpu.md" || true
