"""The trainable policy on megatron-core: the `interfaces.Policy` implementation.

Training batches: the pairs of D_t are cut into global batches of `train.global_batch_size`; a
global batch is dealt round-robin over data-parallel ranks, and each rank's share is split into
micro-batches of `train.micro_batch_size` pairs, or, with `train.micro_batch_tokens` > 0, into
micro-batches filled greedily up to that many packed tokens (`packing.epoch_layout`; a rank with fewer
gets empty ones). A micro-batch is ONE packed row (megatron/packing.py):
each pair as [prompt | chosen | rejected], the prompt run once for both responses, no padding, and the
LM head and log-softmax only at the positions that predict a response token. Rows are packed when the
schedule asks for them (`LazyMicrobatches`), and carry per-token segment ids, not an S x S mask (the core
attention, megatron/attention.py, builds its mask from them on the device). An empty share becomes a
masked dummy pair so every rank runs the same number of micro-batches. The loss is the MEAN over the
real pairs of the global batch: each micro-batch returns the SUM of its per-pair losses and its count
of real pairs, and with `calculate_per_token_loss` megatron's finalize_model_grads divides the summed
gradients by the count all-reduced over data-parallel ranks (tests/multiproc/test_gradient_reference.py
checks it against float64 autograd through transformers).

Reference log-probs (`pair_logprobs`) use the very micro-batches of the first epoch's steps, so at the
first step of an iteration the policy's log-probs equal the reference's bit for bit (the margin starts
at exactly 0, in bf16 too).

Forward/backward, optimizer steps and checkpoints are `trainable.MegatronTrainable`'s.

LR schedule: each iteration is a DPO run of its own (paper Appendix C: warm-up ratio 0.1), so
the schedule restarts at every `train()` call with that call's number of optimizer steps; the
optimizer state (Adam moments) carries over between iterations.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch

from optune_nemo.config import ConfigError, OptuneNemoConfig
from optune_nemo.interfaces import PreferenceBatch
from optune_nemo.losses import PairLoss, PairTensors
from optune_nemo.megatron.cpu_compat import model_parallel_seed
from optune_nemo.megatron.logprobs import vocab_parallel_token_logprobs
from optune_nemo.megatron.model import build_gpt_model, padded_vocab_size
from optune_nemo.megatron.packing import PackedBatch, epoch_layout, group_length, pack_groups, sum_per_output
from optune_nemo.megatron.parallel import pipeline_last_rank
from optune_nemo.megatron.trainable import MegatronTrainable, wrap_for_training
from optune_nemo.runtime.distributed import DistEnv, all_gather_object, broadcast_object, gather_shards, shard
from optune_nemo.runtime.seeding import generator

log = logging.getLogger(__name__)

FP8_TOKEN_MULTIPLE = 32
"""Transformer Engine's FP8 GEMMs need the token dimension divisible by 8 (16 for per-tensor scaling's
weight-gradient GEMM on Hopper, 16 for blockwise, 32 for MXFP8 blocks): packed rows are rounded up to 32."""

class MegatronPolicy(MegatronTrainable):
    """`interfaces.Policy` on a megatron-core GPTModel (DDP-wrapped) and a megatron optimizer."""

    def __init__(self, cfg: OptuneNemoConfig, *, model, optimizer, dist: DistEnv, vocab_size: int,
                 pad_token_id: int, hf_dir: Path | None = None):
        super().__init__(model=model, optimizer=optimizer, dist=dist, optim=cfg.optim,
                         use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
        self.cfg = cfg
        self.vocab_size, self.pad_token_id = vocab_size, pad_token_id
        self.padded_vocab_size = padded_vocab_size(vocab_size, cfg.model, dist.tp_size)
        self.hf_dir = hf_dir
        self._decoder = None
        self._rotary_table = None

    # ------------------------------------------------------------------ helpers

    def inference_model(self):
        """The KV-cached incremental forward the torch engine runs on (the training weights, no copy)."""
        if self._decoder is None:
            from optune_nemo.megatron.inference import MegatronDecoder

            self._decoder = MegatronDecoder(self.unwrapped_model(), dist=self.dist, vocab_size=self.vocab_size,
                                            max_sequence_length=self.cfg.model.seq_length)
        return self._decoder

    # ------------------------------------------------------------------ Hugging Face weights

    def load_hf_weights(self, hf_dir: Path) -> None:
        """Copy the HF model's weights into this rank's chunk (its slices only). With bf16 the optimizer
        keeps fp32 main parameters of its own: they are refreshed from the new weights, or the first
        step would write the random initialisation back into the model."""
        from optune_nemo.megatron.hf_import import load_hf_weights_into

        d = self.dist
        load_hf_weights_into(self.unwrapped_model(), hf_dir, model_cfg=self.cfg.model, tp_rank=d.tp_rank,
                             tp_size=d.tp_size, pp_rank=d.pp_rank, pp_size=d.pp_size)
        self.optimizer.reload_model_params()

    def hf_weights(self, dtype: torch.dtype | None = None):
        """`interfaces.Policy.hf_weights`: HF-named whole tensors, on the policy's device."""
        from optune_nemo.megatron.hf_export import iter_hf_tensors

        return iter_hf_tensors(self.model, self.cfg.model, vocab_size=self._hf_vocab_size(), dist=self.dist,
                               dtype=dtype)

    def _hf_vocab_size(self) -> int:
        if self.hf_dir is None:
            return self.vocab_size
        from optune_nemo.megatron.hf_import import read_hf_config

        return read_hf_config(self.hf_dir).vocab_size

    def export_hf(self, out_dir: str | Path, *, tokenizer) -> Path | None:
        """`interfaces.Policy.export_hf`: the source model's architecture and config, these weights."""
        from optune_nemo.megatron.hf_export import export_hf
        from optune_nemo.megatron.hf_import import read_hf_config

        if self.hf_dir is None:
            raise ConfigError("policy.hf_path: exporting a Hugging Face directory needs a pretrained source "
                              "model (its architecture and config); the tiny random model has none")
        info = read_hf_config(self.hf_dir)
        return export_hf(self.model, self.cfg.model, out_dir, tokenizer=tokenizer, architecture=info.architecture,
                         dist=self.dist, vocab_size=info.vocab_size, hf_config=info.config, overwrite=True)

    # ------------------------------------------------------------------ packed forward

    def _rotary(self, positions_BS: torch.Tensor) -> torch.Tensor:
        """Rotary frequencies per token [S, B, 1, dim] (positions restart after a shared prompt)."""
        if self._rotary_table is None:
            self._rotary_table = self.unwrapped_model().rotary_pos_emb(self.cfg.model.seq_length)[:, 0, 0]
        return self._rotary_table[positions_BS].transpose(0, 1).unsqueeze(2)

    def _forward(self, model, mb: PackedBatch) -> torch.Tensor:
        """One packed micro-batch through this rank's chunk (`model`, DDP-wrapped). The last pipeline stage
        returns the log-prob of every label [N]: the LM head and the log-softmax run only at the positions
        that predict a response token. Other stages return their hidden states for the next stage."""
        m = model.module
        emb = m.embedding(input_ids=mb.tokens_BS, position_ids=mb.positions_BS) if m.pre_process else None
        # the segment ids are the mask (megatron/attention.py builds it on the device); megatron's own
        # DotProductAttention (attention_backend=local) takes the dense form
        mask = mb.mask_B1SS if self.cfg.model.attention_backend == "local" else mb.segments
        hidden = m.decoder(hidden_states=emb, attention_mask=mask, rotary_pos_emb=self._rotary(mb.positions_BS))
        if not m.post_process:
            return hidden
        h = hidden.transpose(0, 1).reshape(-1, hidden.shape[-1]).index_select(0, mb.label_index_N)   # [N, H]
        weight = m.shared_embedding_or_output_weight() if m.share_embeddings_and_output_weights else None
        logits, _ = m.output_layer(h.unsqueeze(0), weight=weight)                                  # [1, N, V/tp]
        return vocab_parallel_token_logprobs(logits, mb.labels_N[None], real_vocab_size=self.vocab_size,
                                             tp_rank=self.dist.tp_rank)[0]

    def _pack(self, groups: list, length: int | None = None) -> PackedBatch:
        return pack_groups(groups, pad_id=self.pad_token_id, length=length,
                           multiple_of=FP8_TOKEN_MULTIPLE if self.cfg.precision == "fp8" else 1).to(self.dist.device)

    def _row_length(self, micro_batches: list[list]) -> int | None:
        """Pipeline stages exchange fixed shapes: every micro-batch of a pipeline has the longest one's length
        (the data, hence the length, is the same on every stage). Without PP each keeps its own."""
        if self.dist.pp_size == 1:
            return None
        mult = FP8_TOKEN_MULTIPLE if self.cfg.precision == "fp8" else 1
        longest = max(sum(group_length(g) for g in mb) for mb in micro_batches)
        return -(-longest // mult) * mult

    def _forward_only(self, micro_batches: list[list]) -> list[torch.Tensor]:
        """Per-response summed log-probs of each micro-batch of groups, on the last stage (every stage gets
        the list from it)."""
        length = self._row_length(micro_batches)
        data = LazyMicrobatches(micro_batches, lambda mb: self._pack(mb, length))

        def loss_func(mb, output):
            return torch.zeros((), device=output.device), torch.tensor(1), {"logps": sum_per_output(output, mb)}

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            return self._forward(model, mb), partial(loss_func, mb)

        self.set_train_mode(False)
        with torch.no_grad():
            out = self.forward_backward(data, forward_step=forward_step, seq_length=length or 0, rows=1,
                                        forward_only=True) if data else []
        sums = [o["logps"].float().cpu() for o in out]
        if self.dist.pp_size > 1:
            sums = broadcast_object(sums if self.dist.is_last_pp_stage else None, src=pipeline_last_rank(),
                                    group=self.dist.pp_group)
        return sums

    # ------------------------------------------------------------------ log-probs

    def sequence_logprobs(self, prompts: Sequence[Sequence[int]],
                          responses: Sequence[Sequence[int]]) -> torch.Tensor:
        """[P] float32 summed response log-probs, on every rank, in input order."""
        d, n, per_mb = self.dist, len(prompts), 2 * self.cfg.train.micro_batch_size
        mine = shard(n, d.dp_rank, d.dp_size)
        micro = [mine[k:k + per_mb] for k in range(0, len(mine), per_mb)]
        sums = self._forward_only([[(prompts[i], [responses[i]]) for i in mb] for mb in micro])
        local = torch.cat(sums).tolist() if sums else []
        return torch.tensor(gather_shards(local, n, group=d.dp_group), dtype=torch.float32)

    def pair_logprobs(self, prompts, chosen, rejected, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`interfaces.Policy.pair_logprobs`: (chosen, rejected) summed log-probs [P] each, on every rank,
        computed with the micro-batches `train(..., seed=seed)` forms in its first epoch (same packing, same
        order), so the reference of an iteration equals the policy's log-probs at its first step bit for bit,
        whatever the precision."""
        d, n = self.dist, len(prompts)
        pairs = [(p, [c, r]) for p, c, r in zip(prompts, chosen, rejected)]
        layout = self._epoch_layout([group_length(g) for g in pairs], seed, 0)
        micro = [mb for step in layout for mb in step if mb]   # no dummies: no step
        sums = self._forward_only([[pairs[i] for i in mb] for mb in micro])
        local = [(i, s[2 * k].item(), s[2 * k + 1].item()) for mb, s in zip(micro, sums) for k, i in enumerate(mb)]
        out_c, out_r = torch.empty(n), torch.empty(n)
        for part in all_gather_object(local, group=d.dp_group):
            for i, c, r in part:
                out_c[i], out_r[i] = c, r
        return out_c, out_r

    def _epoch_layout(self, lengths: Sequence[int], seed: int, epoch: int) -> list[list[list[int]]]:
        """This rank's micro-batches of pair indices, per optimizer step of `epoch` (`lengths`: each pair's
        packed length, `group_length`): the epoch's order (shuffled by seed and epoch), laid out by
        `packing.epoch_layout` (global batches dealt round-robin over data-parallel ranks, each share cut
        into micro-batches of train.micro_batch_size pairs or up to train.micro_batch_tokens tokens; every
        rank gets the same number of micro-batches in a step, an empty one being a masked dummy pair)."""
        d, t, n = self.dist, self.cfg.train, len(lengths)
        order = (torch.randperm(n, generator=generator(seed, "epoch", epoch)).tolist() if t.shuffle
                 else list(range(n)))
        return epoch_layout(order, lengths, global_batch_size=t.global_batch_size,
                            micro_batch_size=t.micro_batch_size, micro_batch_tokens=t.micro_batch_tokens,
                            dp_rank=d.dp_rank, dp_size=d.dp_size)

    # ------------------------------------------------------------------ training

    def train(self, batch: PreferenceBatch, loss: PairLoss, *, epochs: int,
              seed: int) -> list[dict[str, float]]:
        names = metric_names(loss)
        lengths = [group_length((p, [c, r])) for p, c, r in zip(batch.prompts, batch.chosen, batch.rejected)]
        layouts = [self._epoch_layout(lengths, seed, epoch) for epoch in range(epochs)]
        scheduler = self.scheduler(sum(len(steps) for steps in layouts))
        return [self._step(batch, micro, loss, names, scheduler) for steps in layouts for micro in steps]

    def _pair_microbatch(self, batch: PreferenceBatch, idx: list[int], length: int | None) -> dict:
        """A packed micro-batch of pairs [prompt | chosen | rejected]; an empty share is one dummy pair with
        mask 0 (a rank still runs the step's micro-batches and its collectives)."""
        real = len(idx)
        idx = idx or [0]
        packed = self._pack([(batch.prompts[i], [batch.chosen[i], batch.rejected[i]]) for i in idx], length)
        pick = torch.tensor(idx, dtype=torch.long)
        mask = torch.full((len(idx),), 1.0 if real else 0.0)
        dev = self.dist.device
        return {"packed": packed, "pair_mask": mask.to(dev),
                **{k: getattr(batch, k)[pick].to(dev) for k in
                   ("ref_chosen_logps", "ref_rejected_logps", "chosen_rewards", "rejected_rewards")}}

    def _step(self, batch: PreferenceBatch, micro: list[list[int]], loss: PairLoss, names: list[str],
              scheduler) -> dict:
        length = self._row_length([[(batch.prompts[i], [batch.chosen[i], batch.rejected[i]]) for i in mb or [0]]
                                   for mb in micro])
        data = LazyMicrobatches(micro, lambda mb: self._pair_microbatch(batch, mb, length))

        def loss_func(mb, output):
            logps = sum_per_output(output, mb["packed"])              # [2P]: chosen, rejected of each pair
            per_pair, metrics = loss(PairTensors(logps[0::2], logps[1::2], mb["ref_chosen_logps"],
                                                 mb["ref_rejected_logps"], mb["chosen_rewards"],
                                                 mb["rejected_rewards"]))
            m = mb["pair_mask"]
            # masked sums: the loss and every metric, then the count of real pairs (dummies excluded)
            sums = torch.stack([(per_pair * m).sum(), *((metrics[k].float() * m).sum() for k in names),
                                m.sum()]).detach()
            return (per_pair * m).sum(), m.sum().to(torch.int), {"sums": sums}

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            return self._forward(model, mb["packed"]), partial(loss_func, mb)

        out, ok, grad_norm, lr = self.train_step(data, forward_step=forward_step, seq_length=length or 0, rows=1,
                                                 scheduler=scheduler)
        sums = self.reduce_sums(out, "sums", len(names) + 2)
        count = float(sums[-1])
        values = dict(zip(["loss", *names], (sums[:-1] / max(count, 1.0)).tolist()))
        return {**values, "num_pairs": int(count), "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "skipped": 0.0 if ok else 1.0}


class LazyMicrobatches:
    """The micro-batches of one schedule call, made as the schedule asks for them: `make(item)` packs a row
    (and copies it to the device) only when its forward step runs, so no micro-batch is held before its
    turn. The schedule needs their number up front (`len`) and iterates once."""

    def __init__(self, items: list, make):
        self.items, self.make = items, make

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return map(self.make, self.items)


def metric_names(loss: PairLoss) -> list[str]:
    """The names of the per-pair metrics `loss` reports (sorted), from a call on one dummy pair: every
    pipeline stage must reduce the same vector, and only the last stage evaluates the loss."""
    one = torch.zeros(1, dtype=torch.float64)
    return sorted(loss(PairTensors(one, one, one, one, one, one))[1])


def build_policy(cfg: OptuneNemoConfig, *, vocab_size: int, pad_token_id: int, dist: DistEnv,
                 hf_dir: Path | None = None) -> MegatronPolicy:
    """Model (DDP-wrapped) + megatron optimizer. The LR schedule is sized per iteration, in `train`
    (module docstring)."""
    from megatron.core import parallel_state as ps

    from optune_nemo.runtime.hardware import resolve_precision

    cfg = resolve_precision(cfg)         # idempotent: callers that skipped runner.resolve get the same choice
    model_parallel_seed(cfg.seed)
    gpt = build_gpt_model(cfg.model, vocab_size=vocab_size, tp_size=dist.tp_size, pp_size=dist.pp_size,
                          pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                          precision=cfg.precision, fp8_cfg=cfg.fp8, init_seed=cfg.seed)
    model, optimizer = wrap_for_training(gpt, optim=cfg.optim,
                                         use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
                                         bf16=cfg.precision in ("bf16", "fp8"))
    return MegatronPolicy(cfg, model=model, optimizer=optimizer, dist=dist, vocab_size=vocab_size,
                          pad_token_id=pad_token_id, hf_dir=hf_dir)
