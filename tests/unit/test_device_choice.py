"""Where a process runs and what its GPU can do, decided on CPU by faking what CUDA reports: the device of a
task (one visible GPU: cuda:0; several: its local rank's), and the FP8 recipes a GPU generation refuses."""

import pytest
import torch

from optune_nemo.config import ConfigError, check_fp8_recipe, load_config, validate
from optune_nemo.runtime.distributed import local_device


@pytest.fixture
def gpus(monkeypatch):
    def fake(count):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    for name in ("LOCAL_RANK", "SLURM_LOCALID", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    return fake


def test_no_gpu_is_the_cpu(gpus, monkeypatch):
    gpus(0)
    monkeypatch.setenv("SLURM_LOCALID", "3")
    assert local_device() == torch.device("cpu")


def test_one_visible_gpu_is_cuda_0_whatever_the_local_rank(gpus, monkeypatch):
    """srun --gpus-per-task=1: task 3 of the node sees only its own GPU, as cuda:0."""
    gpus(1)
    monkeypatch.setenv("SLURM_LOCALID", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert local_device() == torch.device("cuda", 0)


@pytest.mark.parametrize(("env", "expected"), [({"SLURM_LOCALID": "5"}, 5),
                                               ({"LOCAL_RANK": "2", "SLURM_LOCALID": "5"}, 2), ({}, 0)])
def test_several_visible_gpus_are_chosen_by_local_rank(gpus, monkeypatch, env, expected):
    gpus(8)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert local_device() == torch.device("cuda", expected)


def test_a_local_rank_beyond_the_visible_gpus_is_an_error(gpus, monkeypatch):
    gpus(2)
    monkeypatch.setenv("SLURM_LOCALID", "2")
    with pytest.raises(ConfigError, match="local rank 2 has no GPU: this process sees 2"):
        local_device()


@pytest.mark.parametrize(("capability", "refused"), [((9, 0), True), ((8, 9), True), ((10, 0), False),
                                                     ((12, 0), False), (None, False)])
def test_mxfp8_needs_blackwell(capability, refused):
    if refused:
        with pytest.raises(ConfigError, match=r"^fp8\.recipe: mxfp8 needs a Blackwell GPU"):
            check_fp8_recipe("mxfp8", capability)
    else:
        check_fp8_recipe("mxfp8", capability)
    for other in ("delayed", "tensorwise", "blockwise"):
        check_fp8_recipe(other, capability)


def test_validate_refuses_mxfp8_on_a_hopper(monkeypatch):
    cfg = load_config(["precision=fp8", "model.transformer_impl=transformer_engine", "fp8.recipe=mxfp8"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with pytest.raises(ConfigError, match="fp8.recipe"):
        validate(cfg)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    validate(cfg)
