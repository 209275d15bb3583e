"""The Dockerfile and pyproject.toml agree (the image cannot be built on this machine: no Docker
engine). A version bumped on one side only must fail these checks."""

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def check(dockerfile: str, pyproject: dict, requirements: str) -> list[str]:
    """Every disagreement between the image and the package metadata, as readable lines."""
    problems = []
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", dockerfile, flags=re.M))
    gpu = {_name(r): r for r in pyproject["project"]["optional-dependencies"]["gpu"]}
    deps = {_name(r): r for r in pyproject["project"]["dependencies"]}
    pins = {"tensorrt-llm": args.get("TRTLLM_VERSION"), "transformer-engine": args.get("TE_VERSION")}
    for pkg, version in pins.items():
        if gpu.get(pkg, "").split("==")[-1] != version:
            problems.append(f"{pkg}: pyproject gpu extra {gpu.get(pkg)!r} vs Dockerfile {version!r}")
    if deps["megatron-core"].split("==")[-1] != args.get("MEGATRON_CORE_VERSION"):
        problems.append(f"megatron-core: pyproject {deps['megatron-core']!r} vs Dockerfile "
                        f"{args.get('MEGATRON_CORE_VERSION')!r}")
    base = args.get("BASE_IMAGE", "")
    if not base.startswith("nvcr.io/nvidia/") or base.endswith(":latest") or ":" not in base:
        problems.append(f"base image not a pinned NGC tag: {base!r}")
    if re.search(r"torch==|install[^\n]*\btorch\b[^_]", dockerfile.replace("--no-deps", "")):
        problems.append("the Dockerfile installs torch over the image's CUDA build")
    if "pip install --no-cache-dir --no-deps -e ." not in dockerfile:
        problems.append("the package must be installed with --no-deps (its torch pin is the CPU wheel's)")
    listed = {_name(line): line.strip() for line in requirements.splitlines()
              if line.strip() and not line.startswith("#")}
    for name, req in deps.items():
        if name == "torch":
            if "torch" in listed:
                problems.append("docker/requirements-gpu.txt must not list torch")
        elif listed.get(name) != req:
            problems.append(f"docker/requirements-gpu.txt: {name} is {listed.get(name)!r}, pyproject says {req!r}")
    return problems


def _files():
    return ((ROOT / "Dockerfile").read_text(), tomllib.loads((ROOT / "pyproject.toml").read_text()),
            (ROOT / "docker" / "requirements-gpu.txt").read_text())


def test_dockerfile_agrees_with_pyproject():
    assert check(*_files()) == []


@pytest.mark.parametrize("edit", ["trtllm", "te", "megatron", "requirements", "torch", "latest"])
def test_a_one_sided_change_is_caught(edit):
    dockerfile, pyproject, requirements = _files()
    if edit == "trtllm":
        dockerfile = dockerfile.replace("ARG TRTLLM_VERSION=1.2.1", "ARG TRTLLM_VERSION=1.3.0")
    elif edit == "te":
        pyproject["project"]["optional-dependencies"]["gpu"][0] = "transformer-engine[pytorch]==2.21.0"
    elif edit == "megatron":
        pyproject["project"]["dependencies"][1] = "megatron-core==0.17.0"
    elif edit == "requirements":
        requirements = requirements.replace("hydra-core==1.3.8", "hydra-core==1.3.9")
    elif edit == "torch":
        requirements += "torch==2.13.0\n"
    else:
        dockerfile = re.sub(r"ARG BASE_IMAGE=\S+", "ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:latest", dockerfile)
    assert check(dockerfile, pyproject, requirements) != []
