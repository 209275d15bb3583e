"""Issue 12's device rule, checked on CPU: the code that runs on the model's device (the torch engine's
decode loop, the decoder's inference path, the log-prob math, the TensorRT-LLM engine) creates no tensor on
an implicit device. Every torch factory call passes `device=` (taken from the model or its inputs), or
says on its line why it belongs on the host (`# host: ...`). A factory without either is what put tensors on
the CPU while the model sat on the GPU; this scan fails on such a line."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "optune_nemo"
DEVICE_SIDE = ["generation/torch_engine.py", "generation/trtllm_engine.py", "megatron/inference.py",
               "megatron/logprobs.py"]
FACTORIES = {"zeros", "ones", "empty", "full", "arange", "tensor", "rand", "randn", "randint", "linspace", "eye",
             "as_tensor", "randperm", "zeros_like", "ones_like"}


def implicit_device_calls(source: str) -> list[int]:
    lines = source.splitlines()
    bad = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                and node.func.attr in FACTORIES and node.func.attr not in ("zeros_like", "ones_like")):
            if not any(k.arg == "device" for k in node.keywords) and "# host:" not in lines[node.lineno - 1]:
                bad.append(node.lineno)
    return bad


@pytest.mark.parametrize("module", DEVICE_SIDE)
def test_device_side_code_names_the_device(module):
    bad = implicit_device_calls((PKG / module).read_text())
    assert not bad, f"{module}: torch factory calls without device= at lines {bad}"


def test_the_scan_finds_an_implicit_device():
    src = ("import torch\n"
           "def f(x):\n"
           "    a = torch.zeros(3, device=x.device)\n"
           "    b = torch.arange(4)\n"
           "    c = torch.rand(1, generator=None)  # host: CPU generator\n")
    assert implicit_device_calls(src) == [4]
