"""HF import at TP=2 (logits equal transformers') and PP=2 / TP=2 export (gathered tensors equal the
source exactly), on two gloo ranks."""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_ranks
from hf_tiny import VOCAB, hf_logits, make_hf_model, tokens

pytestmark = pytest.mark.multiproc


def _import_export(rank: int, src: str, out: str, tp: int, pp: int):
    from megatron.core import parallel_state as ps

    from optune_nemo.megatron.cpu_compat import model_parallel_seed
    from optune_nemo.megatron.hf_export import export_hf
    from optune_nemo.megatron.hf_import import hf_config_to_model_config, load_hf_weights_into, read_hf_config
    from optune_nemo.megatron.model import build_gpt_model
    from optune_nemo.megatron.parallel import init_distributed

    d = init_distributed(tp, pp)
    model_parallel_seed(0)
    info, mc = read_hf_config(src), hf_config_to_model_config(src)
    model = build_gpt_model(mc, vocab_size=info.vocab_size, tp_size=tp, pp_size=pp,
                            pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    load_hf_weights_into(model, src, model_cfg=mc, tp_rank=d.tp_rank, tp_size=tp, pp_rank=d.pp_rank, pp_size=pp)
    logits = None
    if pp == 1:
        positions = torch.arange(12).unsqueeze(0).expand(2, 12)
        model.eval()
        with torch.no_grad():
            shard = model(tokens(2, 12), positions, None)
        parts = [torch.empty_like(shard) for _ in range(tp)]
        torch.distributed.all_gather(parts, shard, group=d.tp_group)
        logits = torch.cat(parts, -1)[..., :VOCAB]
    export_hf([model], mc, out, tokenizer=None, architecture=info.architecture, dist=d, vocab_size=info.vocab_size,
              hf_config=info.config)
    return logits


def _same_tensors(a_dir, b_dir):
    from safetensors.torch import load_file

    a, b = load_file(f"{a_dir}/model.safetensors"), load_file(f"{b_dir}/model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("kind", ["llama_untied", "qwen2_tied"])
def test_tp2_logits_match_transformers_and_export_is_exact(kind, tmp_path):
    hf = make_hf_model(kind, seed=11)
    hf.save_pretrained(tmp_path / "src")
    results = run_ranks(_import_export, 2, str(tmp_path / "src"), str(tmp_path / "out"), 2, 1)
    ref = hf_logits(hf, tokens(2, 12))
    for logits in results:
        assert (logits - ref).abs().max() < 1e-4
    _same_tensors(tmp_path / "src", tmp_path / "out")


def test_pp2_tied_export_is_exact(tmp_path):
    make_hf_model("llama_tied", seed=12).save_pretrained(tmp_path / "src")
    run_ranks(_import_export, 2, str(tmp_path / "src"), str(tmp_path / "out"), 1, 2)
    _same_tensors(tmp_path / "src", tmp_path / "out")
    ids = tokens()
    assert torch.equal(hf_logits(tmp_path / "out", ids), hf_logits(tmp_path / "src", ids))
