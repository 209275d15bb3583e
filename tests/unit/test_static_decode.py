"""The torch engine's static-cache decode (the CUDA-graph path, run eagerly on CPU): a tiny float64 Llama-like
model that drives its cache through the `IncrementalModel` contract is compared with its own uncached
causal forward (plain attention, written independently of the caches): per-step logits, greedy tokens, and
that the bucket padding (rows and slots) changes nothing. The graph capture itself runs on a GPU only."""

import pytest
import torch

from optune_nemo.generation import torch_engine
from optune_nemo.generation.torch_engine import KVCache, StaticDecoder, TorchEngine
from optune_nemo.interfaces import SamplingParams

V, HID, H, G, D, LAYERS, MAXLEN = 40, 32, 4, 2, 8, 2, 96


class Toy:
    """Pre-norm decoder: RMSNorm, GQA attention with rotary positions, GELU MLP; float64."""

    num_layers, vocab_size, max_sequence_length, is_last_stage, drives_cache = LAYERS, V, MAXLEN, True, True

    def __init__(self, device="cpu", seed=0):
        g = torch.Generator().manual_seed(seed)
        self.device = torch.device(device)

        def w(*shape, scale=0.3):
            return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(self.device)

        self.emb, self.out = w(V, HID, scale=1.0), w(HID, V)
        self.layers = [dict(q=w(HID, H * D), k=w(HID, G * D), v=w(HID, G * D), o=w(H * D, HID),
                            up=w(HID, 64), down=w(64, HID)) for _ in range(LAYERS)]
        inv = 1.0 / (100.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
        self.freqs = (torch.arange(MAXLEN, dtype=torch.float64)[:, None] * inv[None]).to(self.device)

    def from_last_stage(self, obj):
        return obj

    def generating(self):
        return torch.inference_mode()

    def _rope(self, t_RXSD, positions_RS):
        f = self.freqs[positions_RS.clamp(min=0)][:, None]          # [R, 1, S, D/2]
        cos, sin = torch.cat([f.cos(), f.cos()], -1), torch.cat([f.sin(), f.sin()], -1)
        x1, x2 = t_RXSD.chunk(2, -1)
        return t_RXSD * cos + torch.cat([-x2, x1], -1) * sin

    @staticmethod
    def _norm(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def _qkv(self, p, x_RSH, positions_RS):
        R, S = x_RSH.shape[:2]
        h = self._norm(x_RSH)
        q = (h @ p["q"]).view(R, S, H, D).transpose(1, 2)
        k = (h @ p["k"]).view(R, S, G, D).transpose(1, 2)
        v = (h @ p["v"]).view(R, S, G, D).transpose(1, 2)
        return self._rope(q, positions_RS), self._rope(k, positions_RS), v

    def _rest(self, p, x_RSH, ctx_RHSD):
        R, S = x_RSH.shape[:2]
        x = x_RSH + ctx_RHSD.transpose(1, 2).reshape(R, S, H * D) @ p["o"]
        return x + torch.nn.functional.gelu(self._norm(x) @ p["up"]) @ p["down"]

    def forward(self, tokens_RS, positions_RS, cache):
        """The `IncrementalModel` contract: the cache owns keys, values and mask."""
        S = tokens_RS.shape[1]
        x = self.emb[tokens_RS]
        cache.begin_step(S)
        for li, p in enumerate(self.layers):
            q, k, v = self._qkv(p, x, positions_RS)
            x = self._rest(p, x, cache.attend(li, q, k, v))
        cache.end_step(S)
        return self._norm(x[:, -1]) @ self.out

    def full_logits(self, seq):
        """Uncached reference: logits [T, V] of every position of one unpadded sequence, plain causal
        attention with the key/value heads repeated per query head."""
        tokens = torch.tensor([seq], device=self.device)
        T = len(seq)
        positions = torch.arange(T, device=self.device)[None]
        x = self.emb[tokens]
        causal = torch.ones(T, T, dtype=torch.bool, device=self.device).tril()
        for p in self.layers:
            q, k, v = self._qkv(p, x, positions)
            k, v = k.repeat_interleave(H // G, 1), v.repeat_interleave(H // G, 1)
            scores = (q @ k.transpose(-1, -2)) / D ** 0.5
            ctx = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
            x = self._rest(p, x, ctx)
        return (self._norm(x) @ self.out)[0]


class Dist:
    dp_rank, dp_size, dp_group = 0, 1, None


PROMPTS = [[3, 9, 4], [7, 1, 12, 30, 2, 5], [11], [8, 8, 20, 6]]


def _prefill(model, prompts):
    L = max(len(p) for p in prompts)
    pad = torch.tensor([L - len(p) for p in prompts])
    tokens = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    cache = KVCache(model.num_layers, slots=L + 8, start_R=pad)
    logits = model.forward(tokens, torch.arange(L)[None] - pad[:, None], cache)
    return cache, logits, L - pad


def _static_steps(model, prompts, continuation, *, rows_bucket=None, slots=None):
    """Teacher-forced decode of `continuation[r]` after prompt r through a StaticDecoder: logits per step."""
    cache, first, next_pos = _prefill(model, prompts)
    decoder = StaticDecoder(model, graphs=model.device.type == "cuda")
    rows = torch.arange(len(prompts))
    bucket = decoder.prepare(cache, rows, slots or cache.slots)
    if rows_bucket is not None:
        assert bucket["cache"].rows == rows_bucket
    out = [first]
    for step in range(len(continuation[0]) - 1):
        tokens = torch.tensor([c[step] for c in continuation])
        out.append(decoder.step(bucket, tokens, next_pos + step))
    return out


def test_static_decode_logits_equal_an_uncached_forward():
    model = Toy()
    continuation = [[(5 * r + 3 * s) % V for s in range(6)] for r in range(len(PROMPTS))]
    steps = _static_steps(model, PROMPTS, continuation)
    for r, prompt in enumerate(PROMPTS):
        reference = model.full_logits(prompt + continuation[r])
        for s, logits in enumerate(steps):
            # the prefill's attention softmax is float32 (megatron's): float32 rounding, not float64's
            torch.testing.assert_close(logits[r], reference[len(prompt) - 1 + s], rtol=1e-5, atol=1e-6)


def test_bucket_padding_changes_nothing(monkeypatch):
    model = Toy(seed=1)
    continuation = [[(7 * r + s) % V for s in range(5)] for r in range(len(PROMPTS))]
    monkeypatch.setattr(torch_engine, "ROW_BUCKETS", (4,))
    exact = _static_steps(model, PROMPTS, continuation, rows_bucket=4)
    monkeypatch.setattr(torch_engine, "ROW_BUCKETS", (16,))
    monkeypatch.setattr(torch_engine, "SLOT_BUCKET", 64)
    padded = _static_steps(model, PROMPTS, continuation, rows_bucket=16, slots=40)
    for a, b in zip(exact, padded, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch_engine.row_bucket(3) == 16 and torch_engine.slot_bucket(40, MAXLEN) == 64


def test_buckets_round_up_and_cap():
    assert [torch_engine.row_bucket(n) for n in (1, 3, 64, 65, 600)] == [1, 4, 64, 128, 1024]
    assert torch_engine.slot_bucket(130, 2048) == 256
    assert torch_engine.slot_bucket(130, 200) == 200          # capped at the model's longest sequence


def _greedy_reference(model, prompt, steps):
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(model.full_logits(seq)[-1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_engine_greedy_equals_uncached_greedy(mode):
    model = Toy(seed=2)
    engine = TorchEngine(model, decode=str, dist=Dist(), batch_size=3, decode_mode=mode)
    params = SamplingParams(n=2, temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=7, stop_token_ids=(),
                            seed=0)
    out = engine.generate(PROMPTS, params, keys=list(range(len(PROMPTS))))
    for prompt, samples in zip(PROMPTS, out, strict=True):
        assert [s.token_ids for s in samples] == [_greedy_reference(model, prompt, 7)] * 2


def test_static_engine_samples_as_the_dynamic_one_with_stops():
    """Sampling (per-row generators) and stop tokens: the static path, whose finished rows keep running,
    gives the dynamic engine's samples token for token; one prefill per batch in both."""
    params = SamplingParams(n=2, temperature=1.0, top_p=0.9, top_k=0, max_new_tokens=9, stop_token_ids=(1, 2, 3),
                            seed=5)
    results, calls = {}, {}
    for mode in ("dynamic", "static"):
        engine = TorchEngine(Toy(seed=3), decode=str, dist=Dist(), batch_size=2, decode_mode=mode)
        results[mode] = engine.generate(PROMPTS, params, keys=[10, 11, 12, 13])
        engine.end_generation()
        calls[mode] = engine.forward_calls
    assert results["static"] == results["dynamic"]
    assert any(s.finish_reason == "stop" for group in results["static"] for s in group)
    assert any(s.finish_reason == "length" for group in results["static"] for s in group)
    assert calls["static"] >= calls["dynamic"]      # no compaction, but never more than one prefill per batch


def test_an_unknown_decode_mode_is_refused():
    with pytest.raises(ValueError, match="decode_mode"):
        TorchEngine(Toy(), decode=str, dist=Dist(), batch_size=2, decode_mode="fast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_steps_equal_an_uncached_forward_on_the_gpu():
    model = Toy(device="cuda")
    continuation = [[(5 * r + 3 * s) % V for s in range(6)] for r in range(len(PROMPTS))]
    with torch.inference_mode():
        steps = _static_steps(model, PROMPTS, continuation)
        for r, prompt in enumerate(PROMPTS):
            reference = model.full_logits(prompt + continuation[r])
            for s, logits in enumerate(steps):
                torch.testing.assert_close(logits[r], reference[len(prompt) - 1 + s], rtol=1e-5, atol=1e-6)


def test_cuda_graphs_setting_resolves_per_device_and_model():
    from types import SimpleNamespace

    from optune_nemo.config import ConfigError
    from optune_nemo.generation import torch_decode_mode

    cpu, gpu = Toy(), SimpleNamespace(device=torch.device("cuda", 0), drives_cache=True)
    legacy = SimpleNamespace(device=torch.device("cuda", 0))          # a forward that builds its own mask
    assert torch_decode_mode("auto", model=cpu, tp_size=1) == "dynamic"
    assert torch_decode_mode("auto", model=gpu, tp_size=1) == "graphs"
    assert torch_decode_mode("auto", model=gpu, tp_size=2) == "dynamic"
    assert torch_decode_mode("auto", model=legacy, tp_size=1) == "dynamic"
    assert torch_decode_mode("off", model=gpu, tp_size=1) == "dynamic"
    assert torch_decode_mode("on", model=gpu, tp_size=2) == "graphs"
    for model in (cpu, legacy):
        with pytest.raises(ConfigError, match="generation.cuda_graphs"):
            torch_decode_mode("on", model=model, tp_size=1)
