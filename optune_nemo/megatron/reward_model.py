"""The Megatron reward model: a megatron-core GPTModel whose LM output layer is replaced by a scalar head.

Model: `build_gpt_model` (any layer spec, TP, PP) built untied, then its `output_layer` (vocabulary
logits) swapped for `ScalarHead`, a [1, hidden] weight applied to the final hidden state (after the
final norm) at every position; only the last pipeline stage has it. The model's output is [B, T, 1],
and the score of a sequence is read at its LAST NON-PAD token:

    sequence [5, 6, 7, 8] (prompt, response, end token), pad id 0, batch length T = 6:
        tokens_BT = [5, 6, 7, 8, 0, 0]      right padding: the causal mask keeps the pads out of
        last_B    = 3                       every earlier position, so no attention mask is needed
        score     = w . h_3                 w: the head [1, hidden], h: final hidden states

"Last non-pad" is the rightmost position whose token is not the pad id: the rule transformers'
`*ForSequenceClassification` applies with config.json's `pad_token_id`, so an export scores the same
under transformers, right- or left-padded. When the pad id is also the end-of-turn token, both read the
score at the token before it. With no pad id (an imported HF reward model whose config has none,
which transformers then scores one sequence at a time) the last token is read.

A fresh head (starting from a causal LM) is drawn from N(0, 1 / (hidden + 1)), i.e. std
1/sqrt(hidden + 1), with a generator seeded by (seed, "reward_head"): the same on every rank and TP
size. It is held in the model's parameter dtype, like the vocabulary output layer it replaces (bf16
under precision=bf16, fp32 main weights in the optimizer). The head is replicated over tensor-parallel
ranks (it sees the whole hidden state on each), so its gradient needs no tensor-parallel reduction.

Training (`MegatronRewardModel.train_pairs`): the Bradley-Terry loss (paper eq. 1) with an optional
per-pair margin, -log sigmoid(r(x, y_w) - r(x, y_l) - m), averaged over the real pairs of a global
batch. A global batch is dealt round-robin over data-parallel ranks; each rank's share is cut into
micro-batches of `micro_batch_size` pairs (chosen rows then rejected rows: 2 * mbs sequences), short
shares are filled with masked dummy pairs. Each micro-batch returns the SUM of its per-pair losses and
its count of real pairs; with `calculate_per_token_loss` megatron divides the summed gradients by the
count all-reduced over data-parallel ranks (`trainable.py`): the gradient of the mean over the global
batch, whatever the micro-batching and the DP size.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from optune_nemo.config import ModelConfig, OptimConfig
from optune_nemo.losses.bradley_terry import bradley_terry_per_pair
from optune_nemo.megatron.hf_rm import BackboneView, export_hf_rm, is_reward_model_dir, load_hf_rm_into, read_rm_config
from optune_nemo.megatron.trainable import MegatronTrainable, wrap_for_training
from optune_nemo.runtime.distributed import DistEnv, broadcast_object, gather_shards, shard
from optune_nemo.runtime.seeding import generator

META_FILE = "reward_model.json"
"""What a train_rm checkpoint says about its model (`RewardModelMeta`), beside `model/`."""

TOKENIZER_DIR = "tokenizer"
"""The tokenizer files inside a train_rm checkpoint."""

TRAIN_METRICS = ("loss", "accuracy", "margin", "chosen_score", "rejected_score")
"""Per-pair quantities a training step reports (means over the step's real pairs)."""


# --------------------------------------------------------------------------- the model


class ScalarHead(torch.nn.Module):
    """Takes `GPTModel.output_layer`'s place: hidden [S, B, H] -> scores [S, B, 1] in float32. The
    signature is the one `GPTModel._postprocess` calls the output layer with (the shared-weight and
    gather arguments do not apply to a scalar head)."""

    def __init__(self, hidden_size: int, *, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, hidden_size, dtype=dtype, device=device))

    def forward(self, hidden_SBH: torch.Tensor, weight=None, runtime_gather_output=None):
        # float32 scores: in bf16 the product is formed from bf16 inputs but accumulated and returned in fp32
        return F.linear(hidden_SBH.float(), self.weight.float()), None


def head_init_(head: ScalarHead, seed: int) -> None:
    """w ~ N(0, 1 / (hidden + 1)) from a generator seeded by (seed, "reward_head")."""
    hidden = head.weight.shape[1]
    w = torch.randn(1, hidden, generator=generator(seed, "reward_head"), dtype=torch.float32)
    with torch.no_grad():
        head.weight.copy_(w / math.sqrt(hidden + 1))


def build_reward_gpt(model_cfg: ModelConfig, *, vocab_size: int, tp_size: int, pp_size: int, pre_process: bool,
                     post_process: bool, precision: str, init_seed: int | None):
    """This rank's chunk of the reward model: a GPTModel (untied: no output weight shared with the embedding)
    whose output layer is a `ScalarHead` on the last stage, initialised per `head_init_` when `init_seed` is
    given (zeros otherwise: weights to be loaded)."""
    from optune_nemo.megatron.model import build_gpt_model

    gpt = build_gpt_model(replace(model_cfg, untie_embeddings_and_output_weights=True), vocab_size=vocab_size,
                          tp_size=tp_size, pp_size=pp_size, pre_process=pre_process, post_process=post_process,
                          precision=precision, init_seed=init_seed)
    if post_process:
        # the dtype of the output layer it replaces (config.params_dtype), not the final norm's: without
        # Apex / TE megatron's torch norms stay fp32 in a bf16 model, and an fp32 head would share the
        # weight-decay param group with the bf16 matrices. Megatron's DistributedOptimizer puts a group's
        # fp32 params before its bf16 ones in the inner optimizer but indexes them in buffer order, so its
        # checkpoints would pair each param with another's main weights and Adam moments.
        device = gpt.decoder.final_layernorm.weight.device
        gpt.output_layer = ScalarHead(model_cfg.hidden_size, dtype=gpt.config.params_dtype, device=device)
        if init_seed is not None:
            head_init_(gpt.output_layer, init_seed)
    return gpt


# --------------------------------------------------------------------------- batches


def last_non_pad_index(seq: Sequence[int], pad_id: int | None) -> int:
    """The position whose hidden state is scored: the rightmost token that is not `pad_id` (0 when every
    token is), or the last token when there is no pad id (module docstring)."""
    if pad_id is None:
        return len(seq) - 1
    for i in range(len(seq) - 1, -1, -1):
        if seq[i] != pad_id:
            return i
    return 0


@dataclass
class ScoreBatch:
    """Right-padded sequences and where each is scored (layout in the module docstring)."""

    tokens_BT: torch.Tensor        # int64
    position_ids_BT: torch.Tensor  # int64
    last_B: torch.Tensor           # int64

    def to(self, device) -> ScoreBatch:
        return ScoreBatch(self.tokens_BT.to(device), self.position_ids_BT.to(device), self.last_B.to(device))


def make_score_batch(seqs: Sequence[Sequence[int]], *, pad_id: int | None, length: int | None = None) -> ScoreBatch:
    """Right-padded batch of whole sequences; padding uses `pad_id` (0 when there is none)."""
    T = length if length is not None else max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), T), pad_id if pad_id is not None else 0, dtype=torch.long)
    for i, s in enumerate(seqs):
        assert 0 < len(s) <= T, f"sequence of {len(s)} tokens does not fit the batch length {T}"
        tokens[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
    last = torch.tensor([last_non_pad_index(s, pad_id) for s in seqs], dtype=torch.long)
    positions = torch.arange(T, dtype=torch.long).unsqueeze(0).expand(len(seqs), T).contiguous()
    return ScoreBatch(tokens, positions, last)


def pooled_scores(output_BT1: torch.Tensor, last_B: torch.Tensor) -> torch.Tensor:
    """[B] float32: each row's score at its scored position."""
    return output_BT1[torch.arange(output_BT1.shape[0], device=output_BT1.device), last_B, 0].float()


# --------------------------------------------------------------------------- scoring


def score_sequences(model_chunks: list, seqs: Sequence[Sequence[int]], *, pad_id: int | None, rows: int,
                    dist: DistEnv) -> list[float]:
    """Scores of `seqs` on this model-parallel group (collective over its tensor / pipeline ranks, which all
    pass the same `seqs`; nothing crosses data-parallel ranks). Sequences are sorted by length and run in
    batches of `rows`, each padded to its own longest; every rank gets every score."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from optune_nemo.megatron.parallel import pipeline_last_rank

    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    got: list[tuple[list[int], torch.Tensor]] = []

    def loss_func(batch, output):
        return torch.zeros((), device=output.device), torch.tensor(1), {"scores": pooled_scores(output, batch.last_B)}

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        return model(batch.tokens_BT, batch.position_ids_BT, None), partial(loss_func, batch)

    for chunk in model_chunks:
        chunk.eval()
    with torch.no_grad():
        for k in range(0, len(order), rows):
            idx = order[k:k + rows]
            batch = make_score_batch([seqs[i] for i in idx], pad_id=pad_id).to(dist.device)
            out = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter([batch]), model=model_chunks, num_microbatches=1,
                seq_length=batch.tokens_BT.shape[1], micro_batch_size=len(idx), forward_only=True)
            if out:
                got.append((idx, out[0]["scores"].cpu()))
    if dist.pp_size > 1:   # only the last stage computed the scores
        got = broadcast_object(got if dist.is_last_pp_stage else None, src=pipeline_last_rank(), group=dist.pp_group)
    scores = [0.0] * len(seqs)
    for idx, values in got:
        for i, v in zip(idx, values.tolist()):
            scores[i] = float(v)
    return scores


# --------------------------------------------------------------------------- what a checkpoint says


@dataclass(frozen=True)
class RewardModelMeta:
    """A reward model's description, enough to rebuild and export it: `reward_model.json` in a train_rm
    checkpoint (JSON: nothing pickled)."""

    model: ModelConfig
    vocab_size: int
    """The tokenizer's vocabulary: the embedding rows before padding (an export keeps the source's
    `hf_config["vocab_size"]` rows)."""
    pad_token_id: int | None
    """The id whose rightmost non-occurrence is scored (module docstring)."""
    architecture: str | None
    """The causal-LM architecture of the backbone (LlamaForCausalLM, ...) for Hugging Face export; None for
    the tiny model with the byte tokenizer."""
    hf_config: dict | None
    """The source's config.json, kept for export."""

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "model": asdict(self.model)}, indent=1, sort_keys=True) + "\n"

    @staticmethod
    def from_json(text: str) -> RewardModelMeta:
        d = json.loads(text)
        return RewardModelMeta(model=ModelConfig(**d["model"]), vocab_size=int(d["vocab_size"]),
                               pad_token_id=d["pad_token_id"], architecture=d["architecture"],
                               hf_config=d["hf_config"])

    def save(self, directory: Path, tokenizer) -> None:
        """`reward_model.json` and the tokenizer (`tokenizer/`) into `directory`."""
        from optune_nemo.runtime.fileio import write_text_atomic

        write_text_atomic(Path(directory) / META_FILE, self.to_json())
        tokenizer.save(Path(directory) / TOKENIZER_DIR)


def find_rm_checkpoint(path: str | Path, *, key: str) -> Path:
    """The train_rm checkpoint `path` names: a checkpoint directory (it holds `reward_model.json`) or a
    train_rm exp_dir (its newest complete checkpoint). Raises ConfigError naming `key`."""
    from optune_nemo.config import ConfigError
    from optune_nemo.runtime.checkpoint import CheckpointManager, verify_manifest

    p = Path(path).expanduser()
    if (p / META_FILE).is_file():
        problem = verify_manifest(p)
        if problem is not None:
            raise ConfigError(f"{key}: checkpoint {p} is not usable ({problem})")
        return p
    if (p / "checkpoints").is_dir():
        latest = CheckpointManager(p).latest_valid()
        if latest is None or not (latest / META_FILE).is_file():
            raise ConfigError(f"{key}: {p} holds no complete train_rm checkpoint")
        return latest
    if is_reward_model_dir(p):
        raise ConfigError(f"{key}: {p} is a Hugging Face reward model; start from it with policy.hf_path={p} "
                          "(this key takes a train_rm exp_dir or checkpoint)")
    if (p / "config.json").is_file():
        read_rm_config(p, key=key)      # names what the directory is instead (a causal LM, ...)
    raise ConfigError(f"{key}: {p} is neither a train_rm exp_dir nor one of its checkpoints (no {META_FILE})")


def load_saved_tokenizer(directory: Path):
    """The tokenizer a train_rm checkpoint saved (`tokenizer/`): the byte tokenizer or an HF one."""
    from optune_nemo.data.tokenizer import ByteTokenizer

    directory = Path(directory)
    if (directory / "byte_tokenizer.json").is_file():
        return ByteTokenizer()
    from optune_nemo.data.hf_tokenizer import HFTokenizer

    return HFTokenizer.from_pretrained(directory)


def load_model_weights(model, directory: str | Path) -> None:
    """The model part of a dist checkpoint (`MegatronTrainable.save_checkpoint`'s `model/`) into a bare
    model, at any TP / PP (dist checkpointing reshards). Collective."""
    from megatron.core import dist_checkpointing

    from optune_nemo.runtime.safe_unpickle import check_dist_checkpoint, load_dist_checkpoint

    check_dist_checkpoint(str(directory))
    with torch.no_grad():
        state = load_dist_checkpoint(dist_checkpointing, {"model": model.sharded_state_dict()}, str(directory))
        model.load_state_dict(state["model"])


# --------------------------------------------------------------------------- the trainable reward model


@dataclass
class PairMicrobatch:
    seqs: ScoreBatch               # 2 * mbs rows: chosen then rejected
    margin_P: torch.Tensor         # float32
    mask_P: torch.Tensor           # float32, 0 for dummies


class MegatronRewardModel(MegatronTrainable):
    """A reward model being trained: scores, Bradley-Terry steps, Hugging Face import / export, checkpoints."""

    def __init__(self, *, model, optimizer, dist: DistEnv, optim: OptimConfig, use_distributed_optimizer: bool,
                 meta: RewardModelMeta):
        super().__init__(model=model, optimizer=optimizer, dist=dist, optim=optim,
                         use_distributed_optimizer=use_distributed_optimizer)
        self.meta = meta

    @property
    def pad_token_id(self) -> int | None:
        return self.meta.pad_token_id

    # ------------------------------------------------------------------ scores

    def score(self, seqs: Sequence[Sequence[int]], *, rows: int) -> torch.Tensor:
        """[N] float32 scores of whole sequences (prompt, response, end token), on every rank, in input order
        (collective; sharded over data-parallel ranks)."""
        d = self.dist
        mine = shard(len(seqs), d.dp_rank, d.dp_size)
        local = score_sequences(self.model, [seqs[i] for i in mine], pad_id=self.pad_token_id, rows=rows, dist=d)
        return torch.tensor(gather_shards(local, len(seqs), group=d.dp_group), dtype=torch.float32)

    # ------------------------------------------------------------------ training

    def _microbatch(self, pairs, idx: list[int], mbs: int, T: int) -> PairMicrobatch:
        real = len(idx)
        idx = idx + [idx[0] if idx else 0] * (mbs - real)      # dummies, masked below
        seqs = make_score_batch([pairs[i].chosen for i in idx] + [pairs[i].rejected for i in idx],
                                pad_id=self.pad_token_id, length=T)
        mask = torch.zeros(mbs)
        mask[:real] = 1.0
        margin = torch.tensor([pairs[i].margin for i in idx], dtype=torch.float32)
        dev = self.dist.device
        return PairMicrobatch(seqs.to(dev), margin.to(dev), mask.to(dev))

    def train_pairs(self, pairs: Sequence, idx: Sequence[int], *, micro_batch_size: int, scheduler) -> dict:
        """One optimizer step on the global batch `pairs[i] for i in idx` (pairs with `chosen`, `rejected`
        token tuples and a float `margin`; the same `idx` on every rank). Returns the means over its real
        pairs of `TRAIN_METRICS`, and `num_pairs`, `lr`, `grad_norm`, `skipped`."""
        d, mbs = self.dist, micro_batch_size
        idx = list(idx)
        mine = [idx[j] for j in shard(len(idx), d.dp_rank, d.dp_size)]
        num_mb = math.ceil(math.ceil(len(idx) / d.dp_size) / mbs)
        T = max(max(len(pairs[i].chosen), len(pairs[i].rejected)) for i in idx)
        data = [self._microbatch(pairs, mine[k * mbs:(k + 1) * mbs], mbs, T) for k in range(num_mb)]

        def loss_func(mb: PairMicrobatch, output):
            scores = pooled_scores(output, mb.seqs.last_B)
            chosen, rejected = scores[:mbs], scores[mbs:]
            per_pair = bradley_terry_per_pair(chosen, rejected, mb.margin_P)
            m = mb.mask_P
            values = (per_pair, (chosen > rejected).float(), chosen - rejected, chosen, rejected)
            # masked sums of the loss and every metric, then the count of real pairs (dummies excluded)
            sums = torch.stack([*((v * m).sum() for v in values), m.sum()]).detach()
            return (per_pair * m).sum(), m.sum().to(torch.int), {"sums": sums}

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            return model(mb.seqs.tokens_BT, mb.seqs.position_ids_BT, None), partial(loss_func, mb)

        out, ok, grad_norm, lr = self.train_step(data, forward_step=forward_step, seq_length=T, rows=2 * mbs,
                                                 scheduler=scheduler)
        sums = self.reduce_sums(out, "sums", len(TRAIN_METRICS) + 1)
        count = float(sums[-1])
        values = dict(zip(TRAIN_METRICS, (sums[:-1] / max(count, 1.0)).tolist()))
        return {**values, "num_pairs": int(count), "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "skipped": 0.0 if ok else 1.0}

    # ------------------------------------------------------------------ weights

    def load_hf_backbone(self, hf_dir: Path) -> None:
        """A causal LM's weights into the backbone (its LM head is not read; the head keeps its
        initialisation). With bf16 the optimizer's fp32 main parameters are refreshed from the new weights,
        or its first step would write the random initialisation back into the model."""
        from optune_nemo.megatron.hf_import import load_hf_weights_into

        d = self.dist
        load_hf_weights_into(BackboneView(self.unwrapped_model()), hf_dir, model_cfg=self.meta.model,
                             tp_rank=d.tp_rank, tp_size=d.tp_size, pp_rank=d.pp_rank, pp_size=d.pp_size)
        self.optimizer.reload_model_params()

    def load_hf_reward_model(self, hf_dir: Path) -> None:
        """An HF sequence-classification reward model (backbone and `score.weight`), exactly."""
        load_hf_rm_into(self.unwrapped_model(), hf_dir, model_cfg=self.meta.model, dist=self.dist)
        self.optimizer.reload_model_params()

    def load_weights(self, directory: str | Path) -> None:
        """The weights of another train_rm checkpoint's `model/` (not its optimizer)."""
        self.load_checkpoint(str(directory), load_optimizer=False)

    def export_hf(self, out_dir: str | Path, *, tokenizer) -> Path | None:
        """A `*ForSequenceClassification` directory (num_labels 1), written atomically by global rank 0, which
        returns its path; None elsewhere. Collective."""
        return export_hf_rm(self.model, self.meta, out_dir, tokenizer=tokenizer, dist=self.dist, overwrite=True)


def build_reward_model(meta: RewardModelMeta, *, dist: DistEnv, optim: OptimConfig, precision: str,
                       use_distributed_optimizer: bool, seed: int) -> MegatronRewardModel:
    """The reward model (DDP-wrapped) with its megatron optimizer; a fresh head per `head_init_`. `precision`
    is resolved (fp32 | bf16): `auto` would build bf16 weights under an fp32 optimizer."""
    from megatron.core import parallel_state as ps

    assert precision in ("fp32", "bf16"), f"precision {precision!r} is not resolved"
    from optune_nemo.megatron.cpu_compat import model_parallel_seed

    model_parallel_seed(seed)
    gpt = build_reward_gpt(meta.model, vocab_size=meta.vocab_size, tp_size=dist.tp_size, pp_size=dist.pp_size,
                           pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                           precision=precision, init_seed=seed)
    model, optimizer = wrap_for_training(gpt, optim=optim, use_distributed_optimizer=use_distributed_optimizer,
                                         bf16=precision == "bf16")
    return MegatronRewardModel(model=model, optimizer=optimizer, dist=dist, optim=optim,
                               use_distributed_optimizer=use_distributed_optimizer, meta=meta)


# --------------------------------------------------------------------------- a reward model for scoring only


@contextlib.contextmanager
def _rng_untouched():
    """Building a second model must not move the random streams of the run around it (host and device
    RNG, megatron's model-parallel tracker): they are restored afterwards."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from optune_nemo.megatron.cpu_compat import model_parallel_seed

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        tracker = get_cuda_rng_tracker()
        states = tracker.get_states() if tracker.is_initialized() else None
        if states is None:    # no model built in this process yet: the tracker needs states for init
            model_parallel_seed(0)
        try:
            yield
        finally:
            if states is not None:
                get_cuda_rng_tracker().set_states(states)


def build_scoring_model(meta: RewardModelMeta, *, dist: DistEnv, precision: str):
    """This rank's bare chunk of the reward model for inference (no optimizer, eval mode, weights to be
    loaded), in the process groups that already exist (a policy's, when co-located)."""
    from megatron.core import parallel_state as ps

    with _rng_untouched():
        model = build_reward_gpt(meta.model, vocab_size=meta.vocab_size, tp_size=dist.tp_size,
                                 pp_size=dist.pp_size, pre_process=ps.is_pipeline_first_stage(),
                                 post_process=ps.is_pipeline_last_stage(), precision=precision, init_seed=None)
    return model.eval()
