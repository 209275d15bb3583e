"""Tiny reward models and preference data shared by the reward-model tests (module-level so multi-rank
workers can import them)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from hf_tiny import KINDS, VOCAB, hf_config, tiny_tokenizer

PAD = 0   # hf_tiny's configs and tokenizer pad with <unk>, id 0


def make_hf_rm(kind: str, seed: int = 0, **overrides):
    """A `*ForSequenceClassification` of one of hf_tiny's kinds, every parameter randomised (as hf_tiny does:
    norms around 1, the rest N(0, 0.15^2)); num_labels 1 unless overridden."""
    import transformers

    cfg = hf_config(kind, **{"num_labels": 1, **overrides})
    arch = KINDS[kind][0].replace("ForCausalLM", "ForSequenceClassification")
    cfg.architectures = [arch]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(cfg).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            p.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.15 * noise)
    return model


def save_hf_rm(kind: str, directory: Path, seed: int = 0, **overrides) -> Path:
    """`make_hf_rm` saved by transformers, with hf_tiny's tokenizer (chat template included)."""
    make_hf_rm(kind, seed, **overrides).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return Path(directory)


def hf_scores(model_or_dir, seqs: list[list[int]], *, left: bool = False) -> torch.Tensor:
    """Scores by plain transformers (fp32): one padded batch with an attention mask, padded on the right or
    the left; transformers reads each score at the rightmost non-pad token."""
    from transformers import AutoModelForSequenceClassification

    model = model_or_dir
    if isinstance(model, (str, Path)):
        model = AutoModelForSequenceClassification.from_pretrained(model, dtype=torch.float32).eval()
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[:, 0].float()


def random_seqs(n: int, seed: int = 0, lo: int = 3, hi: int = 14) -> list[list[int]]:
    """Sequences of ids in [3, VOCAB) (no pad id, none ends in it) of varied lengths."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


# --------------------------------------------------------------------------- preference data

WORDS = ["apple", "river", "stone", "cloud", "green", "quick", "table", "light"]


def separable_rows(n: int, seed: int = 0, marker: str = "#") -> list[dict]:
    """Pairs where every chosen response contains `marker` (first or last) and no rejected one does: a
    reward model that finds the marker ranks all of them."""
    rng = random.Random(seed)

    def words(k):
        return " ".join(rng.choice(WORDS)[:rng.randint(1, 3)] for _ in range(k))

    rows = []
    for _ in range(n):
        chosen = words(rng.randint(1, 2))
        chosen = f"{chosen} {marker}" if rng.random() < 0.5 else f"{marker} {chosen}"
        rows.append({"prompt": f"q {rng.choice(WORDS)[:2]}", "chosen": chosen, "rejected": words(rng.randint(1, 3))})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Path(path)


TINY_RM = ["policy.hf_path=null", "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=96",
           "model.num_attention_heads=4", "model.num_query_groups=2", "model.init_method_std=0.1",
           "model.seq_length=32", "optim.warmup_ratio=0.0", "optim.lr=0.002", "optim.adam_eps=1e-4",
           "logging.progress=false", "logging.tensorboard=false", "rm.micro_batch_size=4", "rm.global_batch_size=8"]
"""train_rm overrides for the tiny random model with the byte tokenizer (tests/tiny.py's sizes)."""
