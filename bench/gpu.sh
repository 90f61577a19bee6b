#!/usr/bin/env bash
# The GPU checks in one call, most important first, each cut off so the whole fits a time budget (BUDGET_S, default
# 540 s): the compiled-vs-eager CUDA test, then the pipeline benchmark with the paper's U-Nets and ViT-B-32
# (untrained: timing only) at 100 and 3 steps, one process per batch size (each prints its rows as it measures them),
# then the other CUDA tests (tests/test_cuda.py). PRECISION (default bf16+compile,bf16: torch.compile'd, then the
# eager baseline in the same run; fp32 is ~2.7x slower than bf16, README, GPU) and BATCHES (default "1 2") choose.
#   bench/gpu.sh [OUT_DIR] [INPUTS.npz]      # INPUTS: x_ma (HU) [+ y_ma] on aapm_body; default: a simulated slice
set -uo pipefail
out=${1:-outputs/gpu}
inputs=${2:-}
end=$(( $(date +%s) + ${BUDGET_S:-540} ))
left() { echo $(( end - $(date +%s) > 10 ? end - $(date +%s) : 10 )); }
mkdir -p "$out"
export RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, numba, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numba', \
numba.__version__, 'numpy', numpy.__version__)" | tee -a "$out/gpu.txt"
timeout "$(left)" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k compiled 2>&1 | tee "$out/test_cuda.log"
for b in ${BATCHES:-1 2}; do
    timeout "$(left)" python3 bench/pipeline.py --device cuda --precision "${PRECISION:-bf16+compile,bf16}" --batch "$b" \
        --steps 100,3 --repeats 2 ${inputs:+--inputs "$inputs"} --save "$out/pipeline_batch$b.json" 2>&1 \
        | grep -v "^WARNING" | tee "$out/pipeline_batch$b.txt"
done
timeout "$(left)" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "not compiled" 2>&1 \
    | tee -a "$out/test_cuda.log"
