"""Each redirection of the CPU compatibility layer (active only without CUDA)."""

import time

import pytest
import torch

from optune_nemo.megatron import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is inactive with CUDA")


@pytest.fixture(scope="module", autouse=True)
def enabled():
    assert cpu_compat.enable_cpu_compat() is True
    assert cpu_compat.enable_cpu_compat() is True          # idempotent
    assert cpu_compat.cpu_compat_enabled()


def test_cuda_device_arguments_land_on_cpu():
    assert torch.zeros(3, device="cuda").device.type == "cpu"
    assert torch.ones(2, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.tensor([1.0], device="cuda:0").device.type == "cpu"


def test_cuda_moves_are_noops():
    t = torch.arange(4.0)
    assert t.cuda() is t
    assert t.to("cuda").device.type == "cpu"
    assert torch.equal(t.pin_memory(), t)
    assert torch.zeros(2, pin_memory=True).device.type == "cpu"


def test_type_reports_cuda_names():
    assert torch.zeros(2).type() == "torch.cuda.FloatTensor"
    assert torch.zeros(2, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.zeros(2).type(torch.float64).dtype == torch.float64   # the converting form is untouched


def test_rng_tracker_contract():
    tracker = cpu_compat.CpuRNGStatesTracker()
    tracker.add("a", 11)
    tracker.add("b", 12)
    with pytest.raises(Exception, match="already exists"):
        tracker.add("c", 11)
    torch.manual_seed(0)
    outer_expected = torch.rand(3)
    torch.manual_seed(0)
    with tracker.fork("a"):
        a1 = torch.rand(3)
    with tracker.fork("a"):
        a2 = torch.rand(3)
    assert torch.equal(torch.rand(3), outer_expected), "fork must restore the outer stream"
    g = torch.Generator().manual_seed(11)
    assert torch.equal(a1, torch.rand(3, generator=g)) and torch.equal(a2, torch.rand(3, generator=g))
    saved = tracker.get_states()
    with tracker.fork("b"):
        b1 = torch.rand(2)
    tracker.set_states(saved)
    with tracker.fork("b"):
        assert torch.equal(torch.rand(2), b1)
    with pytest.raises(Exception, match="not added"):
        with tracker.fork("zzz"):
            pass


def test_megatron_uses_the_cpu_tracker():
    from megatron.core import tensor_parallel

    assert isinstance(tensor_parallel.get_cuda_rng_tracker(), cpu_compat.CpuRNGStatesTracker)


def test_cuda_event_and_nvtx():
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    time.sleep(0.01)
    end.record()
    end.synchronize()
    assert end.elapsed_time(start) < 0 < start.elapsed_time(end)
    assert start.elapsed_time(end) >= 9.0
    torch.cuda.nvtx.range_push("x")
    torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
