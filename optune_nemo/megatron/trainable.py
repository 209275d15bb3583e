"""A megatron model being trained: DDP-wrapped model chunks with their megatron optimizer, forward /
backward through megatron's pipeline schedules, optimizer steps under a per-call LR schedule, and
sharded dist-checkpoints. The policy (`megatron_policy.py`) and the reward model
(`reward_model.py`) are both `MegatronTrainable`s; each adds its own batches and losses.

Loss scaling: with `calculate_per_token_loss`, a micro-batch's loss function returns the SUM of its
per-item losses and the count of its real items, and megatron's finalize_model_grads divides the
summed gradients by the count all-reduced over data-parallel ranks: the gradient is that of the
MEAN over the real items of the global batch, whatever the micro-batching and the DP size.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as tdist

from optune_nemo.config import OptimConfig
from optune_nemo.megatron.dist_ckpt_helper import install_results_queue
from optune_nemo.runtime.distributed import DistEnv

_DIST_OPT_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def wrap_for_training(module, *, optim: OptimConfig, use_distributed_optimizer: bool, bf16: bool):
    """(model chunks, optimizer) for a bare megatron module built with its TransformerConfig: DDP with fp32
    gradient reduction, the per-token loss scaling above, and megatron's optimizer (bf16: bf16 weights in
    the model, fp32 main weights in the optimizer)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    tcfg = module.config
    tcfg.calculate_per_token_loss = True
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                            use_distributed_optimizer=use_distributed_optimizer)
    chunks = [DistributedDataParallel(config=tcfg, ddp_config=ddp_cfg, module=module)]
    # without this, data-parallel gradients are never all-reduced
    tcfg.finalize_model_grads_func = finalize_model_grads
    o = optim
    opt_cfg = OptimizerConfig(
        # rmsprop: megatron builds its fp32 wrapper around an SGD, whose torch optimizer is then swapped
        optimizer="sgd" if o.optimizer == "rmsprop" else o.optimizer, lr=o.lr, min_lr=o.min_lr,
        weight_decay=o.weight_decay, adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps, clip_grad=o.clip_grad,
        use_distributed_optimizer=use_distributed_optimizer, params_dtype=torch.float32, bf16=bf16)
    optimizer = get_megatron_optimizer(opt_cfg, chunks)
    if o.optimizer == "rmsprop":
        _use_rmsprop(optimizer, o)
    _use_fused_torch_adam(optimizer)
    return chunks, optimizer


def _wrappers(optimizer) -> list:
    """megatron's per-model-chunk optimizer wrappers (a ChainedOptimizer's, or the one given)."""
    return getattr(optimizer, "chained_optimizers", [optimizer])


def _torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside megatron's wrappers."""
    return [opt.optimizer for opt in _wrappers(optimizer) if getattr(opt, "optimizer", None) is not None]


def _step_tensor(value: float, group: dict, p: torch.Tensor) -> torch.Tensor:
    """A per-parameter `step` as torch keeps it: on the parameter's device for fused/capturable kernels."""
    on_device = group.get("fused") or group.get("capturable")
    return torch.tensor(float(value), dtype=torch.float32, device=p.device if on_device else None)


def _use_fused_torch_adam(optimizer) -> None:
    """Without Transformer Engine or Apex (a CPU machine, a bare GPU image) megatron falls back to torch
    Adam/AdamW with torch's default multi-tensor implementation, one pass over the weights per arithmetic
    op; switch its groups to torch's fused kernel (one pass; same update). TE's / Apex's FusedAdam, built in
    NGC containers, is not a torch Adam and is left as it is."""
    for inner in _torch_optimizers(optimizer):
        if type(inner) in (torch.optim.Adam, torch.optim.AdamW) and not inner.state:
            for group in inner.param_groups:
                if not group.get("differentiable"):
                    group["foreach"], group["fused"] = None, True


_SGD_ONLY = ("momentum", "dampening", "nesterov", "maximize", "foreach", "differentiable", "fused")


def _use_rmsprop(optimizer, o: OptimConfig) -> None:
    """Replace the torch SGD inside megatron's (fp32, non-distributed) optimizer wrappers by torch RMSprop
    over the same parameter groups (megatron's per-group keys, weight decay and lr multipliers kept; SGD's
    own keys dropped, so its momentum does not leak into RMSprop). Checkpoints go through megatron's generic
    per-parameter state path (`square_avg` beside the parameters, one common `step`)."""
    for opt in _wrappers(optimizer):
        if "SGD" not in type(opt.optimizer).__name__:    # torch's, or TE's / Apex's FusedSGD on a GPU
            raise RuntimeError(f"rmsprop: expected megatron to build an SGD, got {type(opt.optimizer)}")
        groups = [{k: v for k, v in g.items() if k not in _SGD_ONLY} for g in opt.optimizer.param_groups]
        opt.optimizer = torch.optim.RMSprop(groups, lr=o.lr, alpha=o.rmsprop_alpha, eps=o.rmsprop_eps,
                                            momentum=0.0, centered=False)
        opt.init_state_fn = lambda inner, config=None: _prime_optimizer_state(inner)


class MegatronTrainable:
    def __init__(self, *, model, optimizer, dist: DistEnv, optim: OptimConfig, use_distributed_optimizer: bool):
        self.model, self.optimizer, self.dist = model, optimizer, dist
        self.optim_cfg, self.use_distributed_optimizer = optim, use_distributed_optimizer

    def unwrapped_model(self):
        """The bare megatron module of this rank (for tests and tools that inspect the weights)."""
        return self.model[0].module

    def set_train_mode(self, train: bool) -> None:
        for chunk in self.model:
            chunk.train(train)

    def forward_backward(self, data: list, *, forward_step, seq_length: int, rows: int, forward_only: bool):
        """megatron's schedule (1F1B across pipeline stages) over the micro-batches in `data`."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(data), model=self.model,
            num_microbatches=len(data), seq_length=seq_length, micro_batch_size=rows,
            forward_only=forward_only)

    def scheduler(self, total_steps: int):
        """An LR schedule over `total_steps` optimizer steps: linear warm-up over w = ceil(warmup_ratio *
        total_steps) of them, then `lr_decay_style` down to min_lr.

        w is rounded up so that a short iteration (4 steps at 10 %) still warms up, and the warm-up starts at
        lr / (w + 1) rather than 0, so no step is wasted at lr 0: step k < w runs at lr * (k + 1) / (w + 1)."""
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        o = self.optim_cfg
        warmup = math.ceil(o.warmup_ratio * total_steps - 1e-9) if o.warmup_ratio > 0 else 0
        return OptimizerParamScheduler(
            self.optimizer, init_lr=o.lr / (warmup + 1), max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=warmup,
            lr_decay_steps=max(total_steps, warmup + 1), lr_decay_style=o.lr_decay_style,
            start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=max(total_steps, 1),
            wd_incr_style="constant")

    def train_step(self, data: list, *, forward_step, seq_length: int, rows: int, scheduler):
        """One optimizer step over the micro-batches in `data`: (schedule outputs, ok, grad norm, lr)."""
        self.set_train_mode(True)
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        out = self.forward_backward(data, forward_step=forward_step, seq_length=seq_length, rows=rows,
                                    forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        scheduler.step(increment=1)
        lr = self.optimizer.param_groups[0]["lr"]
        return out, ok, grad_norm, lr

    def reduce_sums(self, out: list[dict], key: str, size: int) -> torch.Tensor:
        """Sum the `key` vectors the loss functions returned, over micro-batches, data-parallel ranks and
        pipeline stages (only the last stage computed them), as float64 on the CPU."""
        d = self.dist
        sums = torch.stack([o[key] for o in out]).sum(0) if out else torch.zeros(size)
        sums = sums.to(d.device, torch.float32)
        tdist.all_reduce(sums, group=d.dp_group)
        if d.pp_size > 1:
            tdist.all_reduce(sums, group=d.pp_group)
        return sums.cpu().double()

    # ------------------------------------------------------------------ checkpoints

    def _sharded_state_dict(self, *, is_loading: bool, optimizer: bool = True) -> dict:
        model_sd = self.unwrapped_model().sharded_state_dict()
        if not optimizer:
            return {"model": model_sd}
        meta = _DIST_OPT_METADATA if self.use_distributed_optimizer else None
        return {"model": model_sd,
                "optimizer": self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=meta)}

    def save_checkpoint(self, directory: str) -> None:
        """Model and optimizer, sharded (megatron dist_checkpointing), into `directory`. Collective."""
        from megatron.core import dist_checkpointing

        install_results_queue()
        # before the first optimizer step Adam has no state, and the distributed optimizer's sharded state
        # dict then refuses to describe it (an iteration whose pairs are all ties, a control run)
        _prime_optimizer_states(self.optimizer)
        os.makedirs(directory, exist_ok=True)
        tdist.barrier()
        dist_checkpointing.save(self._sharded_state_dict(is_loading=False), directory)

    def materialise_optimizer_state(self) -> None:
        """Allocate the optimizer's per-parameter state now (zero moments, step 0: what its first step would
        create, so training is unchanged), so that memory measured from here on (a TensorRT-LLM engine
        sizing its KV cache as a fraction of free GPU memory) already counts it: otherwise about 8 bytes
        per parameter appear at the first step and the engine's KV cache may not fit when it wakes."""
        _prime_optimizer_states(self.optimizer)

    def load_checkpoint(self, directory: str, *, load_optimizer: bool = True) -> None:
        """Restore model and optimizer; `load_optimizer=False` takes the weights only (starting from another
        run's or an imported model). Collective."""
        from megatron.core import dist_checkpointing

        from optune_nemo.runtime.safe_unpickle import check_dist_checkpoint, load_dist_checkpoint

        check_dist_checkpoint(directory)
        if load_optimizer:
            _prime_optimizer_states(self.optimizer)
        with torch.no_grad():
            state = load_dist_checkpoint(
                dist_checkpointing, self._sharded_state_dict(is_loading=True, optimizer=load_optimizer), directory)
            self.unwrapped_model().load_state_dict(state["model"])
            if load_optimizer:
                _fill_missing_steps(state["optimizer"])
                self.optimizer.load_state_dict(state["optimizer"])
        if load_optimizer:
            _restore_per_param_steps(self.optimizer)
        else:   # the optimizer's own fp32 main parameters (bf16) must follow the new weights
            self.optimizer.reload_model_params()


def _prime_optimizer_states(optimizer) -> None:
    """A fresh torch Adam (or RMSprop) has no per-parameter state, and megatron's state dicts (used to build
    the state dict to load into) assert one common `step` over it. Give every parameter zero moments and
    step 0 before a load overwrites them."""
    for inner in _torch_optimizers(optimizer):
        if isinstance(inner, (torch.optim.Adam, torch.optim.RMSprop)):
            _prime_optimizer_state(inner)


def _prime_optimizer_state(inner: torch.optim.Optimizer) -> None:
    """What the first step of torch Adam / RMSprop would create, with zero moments and step 0."""
    for group in inner.param_groups:
        for p in group["params"]:
            if not inner.state[p]:
                step = _step_tensor(0.0, group, p)
                if isinstance(inner, torch.optim.RMSprop):
                    inner.state[p] = {"step": step, "square_avg": torch.zeros_like(p)}
                else:
                    inner.state[p] = {"step": step, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def _fill_missing_steps(optimizer_state) -> None:
    """A checkpoint of an optimizer that never stepped (a no-training control, an iteration of ties) keeps
    no `step`, neither per parameter nor per group, and torch Adam's `__setstate__` then fails on the
    missing key: give such states step 0 (what they are); `_restore_per_param_steps` sets the real ones."""
    for sd in optimizer_state if isinstance(optimizer_state, list) else [optimizer_state]:
        if not isinstance(sd, dict) or not isinstance(sd.get("state"), dict):
            continue
        step = next((g["step"] for g in sd.get("param_groups", []) if "step" in g), 0)
        for st in sd["state"].values():
            if isinstance(st, dict) and st and "step" not in st:
                st["step"] = torch.tensor(float(step))


def _restore_per_param_steps(optimizer) -> None:
    """Without Apex/TE megatron falls back to torch Adam (and RMSProp is torch's), whose per-parameter
    `step` tensors come back from a dist-checkpoint load as one shared, unrestored tensor; the param
    group keeps the restored step. Give every parameter its own copy of the group's step (exact resume)."""
    for inner in _torch_optimizers(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state.get(p)
                if st and "step" in st:   # a group without `step` never stepped: its states keep their own
                    st["step"] = _step_tensor(group["step"] if "step" in group else float(st["step"]), group, p)
