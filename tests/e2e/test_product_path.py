"""The default product path end to end on a tiny Hugging Face Llama built in-process: `policy.hf_path`
(the HF tokenizer with its chat template, the model's real shape, its pretrained weights), the held-out
evaluation after every iteration, per-iteration and final Hugging Face exports that `transformers` loads,
and the reward plot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from hf_tiny import save_hf_model_with_tokenizer

    tmp = tmp_path_factory.mktemp("product")
    hf = save_hf_model_with_tokenizer("llama_untied", tmp / "hf", seed=4)
    exp = tmp / "run"
    args = [f"exp_dir={exp}", f"policy.hf_path={hf}", "policy.export_hf_every_iteration=true",
            "model.seq_length=96", "data.num_prompts=8", "eval.num_prompts=4", "eval.max_new_tokens=6",
            "optune.iterations=2", "generation.max_new_tokens=6", "generation.chunk_size=4",
            "train.global_batch_size=4", "train.micro_batch_size=2", "logging.progress=false", "optim.lr=1e-3",
            "reward.function._target_=optune_nemo.reward.rules.length_reward", "++reward.function.target_chars=12"]
    proc = subprocess.run([sys.executable, "-m", "optune_nemo.train", *args], capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return hf, exp


def _tensors(d):
    from safetensors.torch import load_file

    return load_file(str(Path(d) / "model.safetensors"))


def test_run_completes_with_the_models_shape_and_tokenizer(run):
    hf, exp = run
    assert (exp / "COMPLETED").is_file()
    cfg = (exp / "config.yaml").read_text()
    assert "hidden_size: 64" in cfg and "untie_embeddings_and_output_weights: true" in cfg
    store = __import__("pyarrow.parquet", fromlist=["x"]).read_table(
        exp / "checkpoints" / "iter_000001" / "rollouts.parquet").to_pydict()
    assert all("<|im_start|>" not in r for r in store["response_a"])   # decoded with special tokens skipped
    first = store["prompt_token_ids"][0]
    from optune_nemo.data.hf_tokenizer import HFTokenizer

    tok = HFTokenizer.from_pretrained(hf)
    assert first[:1] == tok.encode("<|im_start|>")                       # the model's chat template


def test_held_out_evaluation_every_iteration(run):
    _, exp = run
    ev = json.loads((exp / "eval.json").read_text())
    assert ev["baseline"]["num_prompts"] == 4 and len(ev["baseline"]["answers"]) == 4
    assert sorted(ev["iterations"]) == ["0", "1"]
    records = [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1]
    for r in records:
        assert {"eval_reward_mean", "eval_accuracy", "eval_win_score", "eval_response_tokens_mean"} <= set(r)
        assert -50 <= r["eval_win_score"] <= 150
    assert (exp / "reward_per_iteration.png").stat().st_size > 1000


def test_exports_load_in_transformers_and_follow_training(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf, exp = run
    source, it0, it1, final = (_tensors(d) for d in (hf, exp / "hf" / "iter_000000", exp / "hf" / "iter_000001",
                                                      exp / "hf" / "final"))
    assert source.keys() == it0.keys() == final.keys()
    assert all(torch.equal(final[k], it1[k]) for k in final)           # the final export is the last iteration
    assert any(not torch.equal(source[k], it0[k]) for k in source)     # training changed the weights
    assert any(not torch.equal(it0[k], it1[k]) for k in it0)
    model = AutoModelForCausalLM.from_pretrained(exp / "hf" / "final", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(exp / "hf" / "final")
    ids = tok.apply_chat_template([{"role": "user", "content": "what is 2 + 3 ?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3
