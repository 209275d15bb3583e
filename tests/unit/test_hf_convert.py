"""`python -m optune_nemo.convert` end to end in subprocesses: HF -> megatron dist checkpoint (TP=2) ->
HF reproduces every tensor; bad inputs exit 2 and write nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_tiny import save_hf_model_with_tokenizer
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]


def convert(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "optune_nemo.convert", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.multiproc
def test_hf_to_mcore_tp2_and_back_is_exact(tmp_path):
    from optune_nemo.data.hf_tokenizer import HFTokenizer
    from optune_nemo.megatron.convert import load_model_config

    src = save_hf_model_with_tokenizer("llama_untied", tmp_path / "src", seed=21)
    r = convert("hf-to-mcore", "--hf", str(src), "--out", str(tmp_path / "mc"), "--tp", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "mc/model/metadata.json").is_file()
    mc = load_model_config(tmp_path / "mc/model_config.yaml")
    assert (mc.num_query_groups, mc.untie_embeddings_and_output_weights, mc.rotary_base) == (2, True, 50000)
    tok = HFTokenizer.from_pretrained(tmp_path / "mc/tokenizer")
    assert tok.vocab_size == 250 and tok.stop_token_ids == (2, 4)

    r = convert("mcore-to-hf", "--ckpt", str(tmp_path / "mc"), "--out", str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "back/model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    back = HFTokenizer.from_pretrained(tmp_path / "back")
    msgs = [{"role": "user", "content": "what is 2 + 3 ?"}]
    assert back.apply_chat_template(msgs) == tok.apply_chat_template(msgs)


def _listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_bad_inputs_exit_2_and_write_nothing(tmp_path):
    src = save_hf_model_with_tokenizer("llama_tied", tmp_path / "src")
    (tmp_path / "empty").mkdir()
    before = _listing(tmp_path)
    cases = [
        (["hf-to-mcore", "--hf", str(tmp_path / "empty"), "--out", str(tmp_path / "o1")], "no config.json"),
        (["hf-to-mcore", "--hf", str(src), "--out", str(tmp_path / "o2"), "--tp", "4"],
         "--tp: 4 must divide the model's num_query_groups"),
        (["mcore-to-hf", "--ckpt", str(src), "--out", str(tmp_path / "o3")], "no megatron dist checkpoint"),
    ]
    for args, message in cases:
        r = convert(*args)
        assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert _listing(tmp_path) == before


def test_unsupported_architecture_exits_2(tmp_path):
    import json

    src = save_hf_model_with_tokenizer("llama_tied", tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(cfg))
    r = convert("hf-to-mcore", "--hf", str(src), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "architectures must be one of" in r.stderr
    assert not (tmp_path / "out").exists()


def test_checkpoint_not_matching_config_exits_2(tmp_path):
    src = save_hf_model_with_tokenizer("llama_tied", tmp_path / "src")
    r = convert("hf-to-mcore", "--hf", str(src), "--out", str(tmp_path / "mc"))
    assert r.returncode == 0, r.stderr[-3000:]
    cfg_path = tmp_path / "mc/model_config.yaml"
    cfg_path.write_text(cfg_path.read_text().replace("ffn_hidden_size: 96", "ffn_hidden_size: 80"))
    r = convert("mcore-to-hf", "--ckpt", str(tmp_path / "mc"), "--out", str(tmp_path / "back"))
    assert r.returncode == 2 and "does not match" in r.stderr, r.stderr[-2000:]
    assert "linear_fc2.weight: checkpoint shape [2, 64, 96], model config implies [2, 64, 80]" in r.stderr
    assert not (tmp_path / "back").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".back")]
