"""The trainable policy on megatron-core: the `interfaces.Policy` implementation.

Training batches: the pairs of D_t are cut into global batches of `train.global_batch_size`; a
global batch is dealt round-robin over data-parallel ranks, and each rank's share is split into
`num_microbatches` micro-batches of `train.micro_batch_size` pairs (chosen and rejected sequences
forward together, 2 * mbs rows). Short shares are filled with masked dummy pairs so every rank runs
the same number of micro-batches. The loss is the MEAN over the real pairs of the global batch:
each micro-batch returns the SUM of its per-pair losses and its count of real pairs, and with
`calculate_per_token_loss` megatron's finalize_model_grads divides the summed gradients by the
count all-reduced over data-parallel ranks (tested against a single-process float reference).

Forward/backward, optimizer steps and checkpoints are `trainable.MegatronTrainable`'s.

LR schedule: each iteration is a DPO run of its own (paper Appendix C: warm-up ratio 0.1), so
the schedule restarts at every `train()` call with that call's number of optimizer steps; the
optimizer state (Adam moments) carries over between iterations.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch

from optune_nemo.config import ConfigError, OptuneNemoConfig
from optune_nemo.distributed import DistEnv, broadcast_object, gather_shards, shard
from optune_nemo.interfaces import PreferenceBatch
from optune_nemo.losses import PairLoss, PairTensors
from optune_nemo.policy.cpu_compat import model_parallel_seed
from optune_nemo.policy.logprobs import make_sequence_batch, sequence_logprobs_from_logits
from optune_nemo.policy.model import build_gpt_model, padded_vocab_size
from optune_nemo.policy.parallel import pipeline_last_rank
from optune_nemo.policy.trainable import MegatronTrainable, wrap_for_training
from optune_nemo.seeding import generator

log = logging.getLogger(__name__)

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

    # ------------------------------------------------------------------ helpers

    def inference_model(self):
        """The KV-cached incremental forward the torch engine runs on (the training weights, no copy)."""
        if self._decoder is None:
            from optune_nemo.policy.inference import MegatronDecoder

            self._decoder = MegatronDecoder(self.unwrapped_model(), dist=self.dist, vocab_size=self.vocab_size,
                                            max_sequence_length=self.cfg.model.seq_length)
        return self._decoder

    # ------------------------------------------------------------------ Hugging Face weights

    def load_hf_weights(self, hf_dir: Path) -> None:
        """Copy the HF model's weights into this rank's chunk (its slices only). With bf16 the optimizer
        keeps fp32 main parameters of its own: they are refreshed from the new weights, or the first
        step would write the random initialisation back into the model."""
        from optune_nemo.policy.hf_import import load_hf_weights_into

        d = self.dist
        load_hf_weights_into(self.unwrapped_model(), hf_dir, model_cfg=self.cfg.model, tp_rank=d.tp_rank,
                             tp_size=d.tp_size, pp_rank=d.pp_rank, pp_size=d.pp_size)
        self.optimizer.reload_model_params()

    def hf_weights(self, dtype: torch.dtype | None = None):
        """`interfaces.Policy.hf_weights`: HF-named whole tensors, on the policy's device."""
        from optune_nemo.policy.hf_export import iter_hf_tensors

        return iter_hf_tensors(self.model, self.cfg.model, vocab_size=self._hf_vocab_size(), dist=self.dist,
                               dtype=dtype)

    def _hf_vocab_size(self) -> int:
        if self.hf_dir is None:
            return self.vocab_size
        from optune_nemo.policy.hf_import import read_hf_config

        return read_hf_config(self.hf_dir).vocab_size

    def export_hf(self, out_dir: str | Path, *, tokenizer) -> Path | None:
        """`interfaces.Policy.export_hf`: the source model's architecture and config, these weights."""
        from optune_nemo.policy.hf_export import export_hf
        from optune_nemo.policy.hf_import import read_hf_config

        if self.hf_dir is None:
            raise ConfigError("policy.hf_path: exporting a Hugging Face directory needs a pretrained source "
                              "model (its architecture and config); the tiny random model has none")
        info = read_hf_config(self.hf_dir)
        return export_hf(self.model, self.cfg.model, out_dir, tokenizer=tokenizer, architecture=info.architecture,
                         dist=self.dist, vocab_size=info.vocab_size, hf_config=info.config, overwrite=True)

    def _logps(self, output, batch):
        return sequence_logprobs_from_logits(output, batch, real_vocab_size=self.vocab_size,
                                             tp_rank=self.dist.tp_rank)

    # ------------------------------------------------------------------ log-probs

    def sequence_logprobs(self, prompts: Sequence[Sequence[int]],
                          responses: Sequence[Sequence[int]]) -> torch.Tensor:
        """[P] float32 summed response log-probs, on every rank, in input order."""
        d, n = self.dist, len(prompts)
        mine = shard(n, d.dp_rank, d.dp_size)
        rows = 2 * self.cfg.train.micro_batch_size
        T = max(len(p) + len(r) for p, r in zip(prompts, responses))
        # every micro-batch has exactly `rows` sequences (pipeline stages exchange fixed shapes):
        # the last one is filled with copies of its first sequence, dropped afterwards
        data = []
        for k in range(0, len(mine), rows):
            idx = mine[k:k + rows]
            idx = idx + [idx[0]] * (rows - len(idx))
            data.append(make_sequence_batch([prompts[i] for i in idx], [responses[i] for i in idx],
                                            pad_id=self.pad_token_id, length=T).to(d.device))

        def loss_func(batch, output):
            logps = self._logps(output, batch).detach()
            return torch.zeros((), device=output.device), torch.tensor(1), {"logps": logps}

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            return model(batch.tokens_BT, batch.position_ids_BT, None), partial(loss_func, batch)

        self.set_train_mode(False)
        with torch.no_grad():
            # equal micro-batch counts are only needed within a pipeline, not across DP ranks
            out = self.forward_backward(data, forward_step=forward_step, seq_length=T,
                                         rows=rows, forward_only=True) if data else []
        local = torch.cat([o["logps"].cpu() for o in out])[:len(mine)] if out else torch.zeros(0)
        if d.pp_size > 1:
            local = broadcast_object(local if d.is_last_pp_stage else None, src=pipeline_last_rank(),
                                     group=d.pp_group)
        return torch.tensor(gather_shards(local.float().tolist(), n, group=d.dp_group), dtype=torch.float32)

    # ------------------------------------------------------------------ training

    def train(self, batch: PreferenceBatch, loss: PairLoss, *, epochs: int,
              seed: int) -> list[dict[str, float]]:
        n, G = len(batch), self.cfg.train.global_batch_size
        names = metric_names(loss)
        steps_per_epoch = math.ceil(n / G)
        scheduler = self.scheduler(epochs * steps_per_epoch)
        metrics = []
        for epoch in range(epochs):
            if self.cfg.train.shuffle:
                gen = generator(seed, "epoch", epoch)
                order = torch.randperm(n, generator=gen).tolist()
            else:
                order = list(range(n))
            for s in range(steps_per_epoch):
                metrics.append(self._step(batch, order[s * G:(s + 1) * G], loss, names, scheduler))
        return metrics

    def _pair_microbatch(self, batch: PreferenceBatch, idx: list[int], mbs: int, T: int) -> dict:
        real = len(idx)
        idx = idx + [idx[0] if idx else 0] * (mbs - real)   # dummies, masked below
        seqs = make_sequence_batch([batch.prompts[i] for i in idx] * 2,
                                   [batch.chosen[i] for i in idx] + [batch.rejected[i] for i in idx],
                                   pad_id=self.pad_token_id, length=T)
        pick = torch.tensor(idx, dtype=torch.long)
        mask = torch.zeros(mbs)
        mask[:real] = 1.0
        return {"seqs": seqs.to(self.dist.device), "pair_mask": mask.to(self.dist.device),
                **{k: getattr(batch, k)[pick].to(self.dist.device) for k in
                   ("ref_chosen_logps", "ref_rejected_logps", "chosen_rewards", "rejected_rewards")}}

    def _step(self, batch: PreferenceBatch, idx: list[int], loss: PairLoss, names: list[str],
              scheduler) -> dict:
        d, mbs = self.dist, self.cfg.train.micro_batch_size
        mine = [idx[j] for j in shard(len(idx), d.dp_rank, d.dp_size)]
        num_mb = math.ceil(math.ceil(len(idx) / d.dp_size) / mbs)
        T = max(len(batch.prompts[i]) + max(len(batch.chosen[i]), len(batch.rejected[i])) for i in idx)
        data = [self._pair_microbatch(batch, mine[k * mbs:(k + 1) * mbs], mbs, T) for k in range(num_mb)]

        def loss_func(mb, output):
            logps = self._logps(output, mb["seqs"])
            per_pair, metrics = loss(PairTensors(logps[:mbs], logps[mbs:], mb["ref_chosen_logps"],
                                                 mb["ref_rejected_logps"], mb["chosen_rewards"],
                                                 mb["rejected_rewards"]))
            m = mb["pair_mask"]
            # masked sums: the loss and every metric, then the count of real pairs (dummies excluded)
            sums = torch.stack([(per_pair * m).sum(), *((metrics[k].float() * m).sum() for k in names),
                                m.sum()]).detach()
            return (per_pair * m).sum(), m.sum().to(torch.int), {"sums": sums}

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            s = mb["seqs"]
            return model(s.tokens_BT, s.position_ids_BT, None), partial(loss_func, mb)

        out, ok, grad_norm, lr = self.train_step(data, forward_step=forward_step, seq_length=T, rows=2 * mbs,
                                                 scheduler=scheduler)
        sums = self.reduce_sums(out, "sums", len(names) + 2)
        count = float(sums[-1])
        values = dict(zip(["loss", *names], (sums[:-1] / max(count, 1.0)).tolist()))
        return {**values, "num_pairs": int(count), "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "skipped": 0.0 if ok else 1.0}


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

    model_parallel_seed(cfg.seed)
    gpt = build_gpt_model(cfg.model, vocab_size=vocab_size, tp_size=dist.tp_size, pp_size=dist.pp_size,
                          pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                          precision=cfg.precision, fp8_cfg=cfg.fp8, init_seed=cfg.seed)
    model, optimizer = wrap_for_training(gpt, optim=cfg.optim,
                                         use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
                                         bf16=cfg.precision in ("bf16", "fp8"))
    return MegatronPolicy(cfg, model=model, optimizer=optimizer, dist=dist, vocab_size=vocab_size,
                          pad_token_id=pad_token_id, hf_dir=hf_dir)
