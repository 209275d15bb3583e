"""The trainable policy on megatron-core: the `types.Policy` implementation.

Training batches: the pairs of D_t are cut into global batches of `train.global_batch_size`; a
global batch is dealt round-robin over data-parallel ranks, and each rank's share is split into
`num_microbatches` micro-batches of `train.micro_batch_size` pairs (chosen and rejected sequences
forward together, 2 * mbs rows). Short shares are filled with masked dummy pairs so every rank runs
the same number of micro-batches. The loss is the MEAN over the real pairs of the global batch:
each micro-batch returns the SUM of its per-pair losses and its count of real pairs, and with
`calculate_per_token_loss` megatron's finalize_model_grads divides the summed gradients by the
count all-reduced over data-parallel ranks (tested against a single-process float reference).

LR schedule: each iteration is a DPO run of its own (paper Appendix C: warm-up ratio 0.1), so
the schedule restarts at every `train()` call with that call's number of optimizer steps; the
optimizer state (Adam moments) carries over between iterations.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from functools import partial

import torch
import torch.distributed as tdist

from optune_nemo.config import OptuneNemoConfig
from optune_nemo.distributed import DistEnv, all_gather_object, broadcast_object
from optune_nemo.policy.cpu_compat import model_parallel_seed
from optune_nemo.policy.dist_ckpt_helper import install_results_queue
from optune_nemo.policy.logprobs import make_sequence_batch, sequence_logprobs_from_logits
from optune_nemo.policy.model import build_gpt_model, padded_vocab_size
from optune_nemo.types import PairLossFn, PreferenceBatch

log = logging.getLogger(__name__)

_METRIC_KEYS = ("loss", "implicit_reward_accuracy", "margin_mean", "wdpo_weight_mean")
_DIST_OPT_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


class MegatronPolicy:
    def __init__(self, cfg: OptuneNemoConfig, *, model, optimizer, dist: DistEnv, vocab_size: int,
                 pad_token_id: int):
        self.cfg, self.model, self.optimizer, self.dist = cfg, model, optimizer, dist
        self.vocab_size, self.pad_token_id = vocab_size, pad_token_id
        self.padded_vocab_size = padded_vocab_size(vocab_size, cfg.model, dist.tp_size)

    # ------------------------------------------------------------------ helpers

    def unwrapped_model(self):
        """The bare GPTModel of this rank (generation runs on these weights, no copy)."""
        return self.model[0].module

    def _forward_backward(self, data: list, *, forward_step, seq_length: int, rows: int,
                          forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(data), model=self.model,
            num_microbatches=len(data), seq_length=seq_length, micro_batch_size=rows,
            forward_only=forward_only)

    def _logps(self, output, batch):
        return sequence_logprobs_from_logits(output, batch, real_vocab_size=self.vocab_size,
                                             tp_rank=self.dist.tp_rank)

    # ------------------------------------------------------------------ log-probs

    def sequence_logprobs(self, prompts: Sequence[Sequence[int]],
                          responses: Sequence[Sequence[int]]) -> torch.Tensor:
        """[P] float32 summed response log-probs, on every rank, in input order."""
        d, n = self.dist, len(prompts)
        mine = list(range(d.dp_rank, n, d.dp_size))
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

        self._set_train_mode(False)
        with torch.no_grad():
            # equal micro-batch counts are only needed within a pipeline, not across DP ranks
            out = self._forward_backward(data, forward_step=forward_step, seq_length=T,
                                         rows=rows, forward_only=True) if data else []
        local = torch.cat([o["logps"].cpu() for o in out])[:len(mine)] if out else torch.zeros(0)
        if d.pp_size > 1:
            from megatron.core import parallel_state as ps

            local = broadcast_object(local if d.is_last_pp_stage else None,
                                     src=ps.get_pipeline_model_parallel_last_rank(), group=d.pp_group)
        result = torch.empty(n, dtype=torch.float32)
        for rank, part in enumerate(all_gather_object(local, group=d.dp_group)):
            result[list(range(rank, n, d.dp_size))] = part.float()
        return result

    def _set_train_mode(self, train: bool) -> None:
        for chunk in self.model:
            chunk.train(train)

    # ------------------------------------------------------------------ training

    def _scheduler(self, total_steps: int):
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        o = self.cfg.optim
        warmup = int(o.warmup_ratio * total_steps)
        return OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=warmup,
            lr_decay_steps=max(total_steps, warmup + 1), lr_decay_style=o.lr_decay_style,
            start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=max(total_steps, 1),
            wd_incr_style="constant")

    def train(self, batch: PreferenceBatch, loss_fn: PairLossFn, *, epochs: int,
              seed: int) -> list[dict[str, float]]:
        n, G = len(batch), self.cfg.train.global_batch_size
        steps_per_epoch = math.ceil(n / G)
        scheduler = self._scheduler(epochs * steps_per_epoch)
        metrics = []
        for epoch in range(epochs):
            if self.cfg.train.shuffle:
                gen = torch.Generator().manual_seed(seed * 7919 + epoch)
                order = torch.randperm(n, generator=gen).tolist()
            else:
                order = list(range(n))
            for s in range(steps_per_epoch):
                metrics.append(self._step(batch, order[s * G:(s + 1) * G], loss_fn, scheduler))
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

    def _step(self, batch: PreferenceBatch, idx: list[int], loss_fn: PairLossFn, scheduler) -> dict:
        d, mbs = self.dist, self.cfg.train.micro_batch_size
        mine = idx[d.dp_rank::d.dp_size]
        num_mb = math.ceil(math.ceil(len(idx) / d.dp_size) / mbs)
        T = max(len(batch.prompts[i]) + max(len(batch.chosen[i]), len(batch.rejected[i])) for i in idx)
        data = [self._pair_microbatch(batch, mine[k * mbs:(k + 1) * mbs], mbs, T) for k in range(num_mb)]

        def loss_func(mb, output):
            logps = self._logps(output, mb["seqs"])
            per_pair, margin, weight = loss_fn(logps[:mbs], logps[mbs:], mb["ref_chosen_logps"],
                                               mb["ref_rejected_logps"], mb["chosen_rewards"],
                                               mb["rejected_rewards"])
            m = mb["pair_mask"]
            sums = torch.stack([(per_pair * m).sum(), ((margin > 0).float() * m).sum(),
                                (margin * m).sum(), (weight * m).sum(), m.sum()]).detach()
            return (per_pair * m).sum(), m.sum().to(torch.int), {"sums": sums}

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            s = mb["seqs"]
            return model(s.tokens_BT, s.position_ids_BT, None), partial(loss_func, mb)

        self._set_train_mode(True)
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        out = self._forward_backward(data, forward_step=forward_step, seq_length=T, rows=2 * mbs,
                                     forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        scheduler.step(increment=1)
        return self._step_metrics(out, ok, grad_norm, scheduler)

    def _step_metrics(self, out, ok, grad_norm, scheduler) -> dict:
        d = self.dist
        sums = torch.stack([o["sums"] for o in out]).sum(0).cpu() if out else torch.zeros(5)
        sums = sums.to(d.device)
        tdist.all_reduce(sums, group=d.dp_group)
        if d.pp_size > 1:   # only the last stage computed the loss; the others hold zeros
            tdist.all_reduce(sums, group=d.pp_group)
        sums = sums.cpu().double()
        count = float(sums[4])
        values = dict(zip(_METRIC_KEYS, (sums[:4] / max(count, 1.0)).tolist()))
        return {**values, "num_pairs": int(count), "lr": self.optimizer.param_groups[0]["lr"]
                if hasattr(self.optimizer, "param_groups") else scheduler.get_lr(None),
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "skipped": 0.0 if ok else 1.0}

    # ------------------------------------------------------------------ checkpoints

    def _sharded_state_dict(self, *, is_loading: bool, optimizer: bool = True) -> dict:
        model_sd = self.model[0].module.sharded_state_dict()
        if not optimizer:
            return {"model": model_sd}
        meta = _DIST_OPT_METADATA if self.cfg.parallel.use_distributed_optimizer else None
        return {"model": model_sd,
                "optimizer": self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                               metadata=meta)}

    def save_checkpoint(self, directory: str) -> None:
        from megatron.core import dist_checkpointing

        install_results_queue()
        os.makedirs(directory, exist_ok=True)
        tdist.barrier()
        dist_checkpointing.save(self._sharded_state_dict(is_loading=False), directory)

    def load_checkpoint(self, directory: str, *, load_optimizer: bool = True) -> None:
        """Restore model and optimizer; `load_optimizer=False` takes the weights only (starting
        a run from another run's or an imported model)."""
        from megatron.core import dist_checkpointing

        if load_optimizer:
            _prime_adam_state(self.optimizer)
        with torch.no_grad():
            state = dist_checkpointing.load(
                self._sharded_state_dict(is_loading=True, optimizer=load_optimizer), directory)
            self.model[0].module.load_state_dict(state["model"])
            if load_optimizer:
                self.optimizer.load_state_dict(state["optimizer"])
        if load_optimizer:
            _restore_adam_steps(self.optimizer)
        # the optimizer's fp32 main params alias the model params here (fp32 training); nothing
        # else to refresh


def _prime_adam_state(optimizer) -> None:
    """A fresh torch Adam has no per-parameter state, and megatron's DistributedOptimizer.state_dict
    (used to build the state dict to load into) asserts one common `step` over it. Give every
    parameter zero moments and step 0 before a load overwrites them."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}


def _restore_adam_steps(optimizer) -> None:
    """Without Apex/TE megatron falls back to torch Adam, whose per-parameter `step` tensors come
    back from a dist-checkpoint load as one shared, unrestored tensor; the param group keeps the
    restored step. Give every parameter its own copy of the group's step (exact resume)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                st = inner.state.get(p)
                if st and "step" in st:
                    st["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


def build_policy(cfg: OptuneNemoConfig, *, vocab_size: int, pad_token_id: int, dist: DistEnv) -> MegatronPolicy:
    """Model (DDP-wrapped) + megatron optimizer. The LR schedule is sized per iteration, in `train`
    (module docstring)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model_parallel_seed(cfg.seed)
    gpt = build_gpt_model(cfg.model, vocab_size=vocab_size, tp_size=dist.tp_size, pp_size=dist.pp_size,
                          pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                          precision=cfg.precision, fp8_cfg=cfg.fp8, init_seed=cfg.seed)
    tcfg = gpt.config
    tcfg.calculate_per_token_loss = True
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
    model = [DistributedDataParallel(config=tcfg, ddp_config=ddp_cfg, module=gpt)]
    tcfg.finalize_model_grads_func = finalize_model_grads
    o = cfg.optim
    opt_cfg = OptimizerConfig(
        optimizer=o.optimizer, lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer, params_dtype=torch.float32,
        bf16=cfg.precision in ("bf16", "fp8"))   # bf16 model weights, fp32 master weights in the optimizer
    optimizer = get_megatron_optimizer(opt_cfg, model)
    return MegatronPolicy(cfg, model=model, optimizer=optimizer, dist=dist, vocab_size=vocab_size,
                          pad_token_id=pad_token_id)
