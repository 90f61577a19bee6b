# The dudocrop image: every Ray node of cluster.yaml and of the KubeRay manifests in deploy/ runs it.
#   docker build -t ghcr.io/your-org/dudocrop:0.1.0 .        (then push; the tag is the one deploy/ and cluster.yaml use)
# CUDA runtime base; the project and Ray in /opt/dudocrop (python3.11, PyPI's CUDA build of torch);
# the vLLM caption runtime in its own venv /opt/vllm (vLLM pins its own torch and transformers), used by
# ray_jobs/caption.py --engine vllm --runtime-env-json '{"py_executable": "/opt/vllm/bin/python"}'.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ARG DEBIAN_FRONTEND=noninteractive
# python3.11 from deadsnakes (Ubuntu 22.04 ships 3.10; the project needs >=3.11); rsync/openssh for the Ray
# cluster launcher; tini reaps Ray's processes when the container stops
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev build-essential \
        rsync openssh-client openssh-server curl ca-certificates tini \
    && rm -rf /var/lib/apt/lists/*

ENV PATH=/opt/dudocrop/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    MPLBACKEND=Agg

# the vLLM runtime first: it changes least often and is the largest layer; ray and the project (no deps) in it
# too, so its Python can run the caption actors
RUN python3.11 -m venv /opt/vllm \
    && /opt/vllm/bin/pip install --no-cache-dir "vllm>=0.29" "ray[data]>=2.60,<2.61" pyarrow pillow

# dependencies before the code, so a code change rebuilds one small layer
COPY pyproject.toml README.md /src/
RUN python3.11 -m venv /opt/dudocrop \
    && mkdir -p /src/dudocrop && touch /src/dudocrop/__init__.py \
    && /opt/dudocrop/bin/pip install --no-cache-dir /src boto3 \
    && /opt/dudocrop/bin/pip uninstall -y dudocrop

COPY dudocrop /src/dudocrop
COPY ray_jobs /src/ray_jobs
COPY serve /src/serve
COPY tune_spaces /src/tune_spaces
RUN /opt/dudocrop/bin/pip install --no-cache-dir --no-deps /src \
    && /opt/vllm/bin/pip install --no-cache-dir --no-deps /src

# the job scripts and configs at a fixed place (RayJob entrypoints run from here)
WORKDIR /src
# Ray's images use this user id; the launcher and KubeRay both run as it
RUN useradd -m -u 1000 -s /bin/bash ray && chown -R ray /src
USER 1000
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["bash"]
