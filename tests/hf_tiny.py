"""Tiny random Hugging Face Llama / Mistral / Qwen2 models for the import/export tests (module-level so
multi-rank workers can import them). fp32, seeded, every parameter randomised (norm weights and Qwen2
biases too: HF initialises those to constants, which would hide layout mistakes)."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 250   # not a multiple of 128: the megatron embedding is padded, and TP=2 splits a padded block

KINDS = {
    # name: (architecture, extra config) -- GQA everywhere (4 heads, 2 KV heads)
    "llama_tied": ("LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama_untied": ("LlamaForCausalLM", {"tie_word_embeddings": False, "rope_theta": 50000.0}),
    "mistral": ("MistralForCausalLM", {"tie_word_embeddings": False, "sliding_window": 4096,
                                       "head_dim": 24}),
    "qwen2_tied": ("Qwen2ForCausalLM", {"tie_word_embeddings": True, "rope_theta": 1000000.0}),
    "qwen2_untied": ("Qwen2ForCausalLM", {"tie_word_embeddings": False}),
}


def hf_config(kind: str, **overrides):
    import transformers

    arch, extra = KINDS[kind]
    cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kw.update(extra)
    kw.update(overrides)
    cfg = cls(**kw)
    cfg.architectures = [arch]
    return cfg


def make_hf_model(kind: str, seed: int = 0, **overrides):
    import transformers

    torch.manual_seed(seed)
    cfg = hf_config(kind, **overrides)
    model = getattr(transformers, KINDS[kind][0])(cfg).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            p.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.15 * noise)
    return model


def save_hf_model(kind: str, directory: Path, seed: int = 0, **overrides) -> Path:
    make_hf_model(kind, seed, **overrides).save_pretrained(directory)
    return Path(directory)


def tokens(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_logits(hf_dir_or_model, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = hf_dir_or_model
    if isinstance(model, (str, Path)):
        model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits.float()


def megatron_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """This rank's vocab shard of the logits [B, T, V/tp] (eval mode, no grad)."""
    positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    model.eval()
    with torch.no_grad():
        return model(ids, positions, None).float()


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> "
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


def tiny_tokenizer():
    """A word-level tokenizer with VOCAB entries: specials, a few words, then filler words w5..w249."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    words = ["hello", "world", "what", "is", "2", "+", "3", "?", "user", "assistant", "system"]
    vocab = {w: i for i, w in enumerate(specials + words)}
    vocab.update({f"w{i}": i for i in range(len(vocab), VOCAB)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", pad_token="<unk>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_hf_model_with_tokenizer(kind: str, directory: Path, seed: int = 0, **overrides) -> Path:
    save_hf_model(kind, directory, seed, **overrides)
    tiny_tokenizer().save_pretrained(directory)
    return Path(directory)


def token_pairs(n: int, vocab: int, seed: int):
    """n (prompt, chosen, rejected) token lists of a tiny HF model's vocabulary (ids >= 5: clear of specials)."""
    g = torch.Generator().manual_seed(seed)

    def seq(lo, hi):
        return torch.randint(5, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return [seq(2, 9) for _ in range(n)], [seq(1, 7) for _ in range(n)], [seq(1, 7) for _ in range(n)]


def hf_response_logprob(hf, prompt, response) -> float:
    """sum_k log p(response_k | prompt, response_<k) from one plain float64 log-softmax of one forward."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(hf(ids).logits[0].double(), dim=-1)
    return sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(response))
