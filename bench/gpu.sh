#!/usr/bin/env bash
# The GPU checks in one call: the CUDA tests (tests/test_cuda.py), then the pipeline benchmark with the paper's
# U-Nets and ViT-B-32 (untrained: timing only) under bf16 autocast, eager and torch.compile'd, batch 1 and 2, 100 and
# 3 steps (fp32 is ~2.7x slower than bf16: README, GPU; add it with PRECISION=fp32,bf16,bf16+compile).
#   bench/gpu.sh [OUT_DIR] [INPUTS.npz]      # INPUTS: x_ma (HU) [+ y_ma] on aapm_body; default: a simulated slice
set -uo pipefail
out=${1:-outputs/gpu}
inputs=${2:-}
mkdir -p "$out"
export RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, numba, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numba', \
numba.__version__, 'numpy', numpy.__version__)" | tee -a "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"
python3 bench/pipeline.py --device cuda --precision "${PRECISION:-bf16,bf16+compile}" --batch 1,2 --steps 100,3 --repeats 2 \
    ${inputs:+--inputs "$inputs"} --save "$out/pipeline.json" 2>&1 | grep -v "^WARNING" | tee "$out/pipeline.txt"
