"""Hydra entry point: `python -m optune_nemo.train_rm data.path=prefs.jsonl key=value ...`.

Trains a Bradley-Terry reward model (paper eq. 1; `megatron/reward_model.py`) on preference pairs
(`data/preferences.py`), starting from a causal LM (`policy.hf_path`: HF directory, .gguf, smollm2; a fresh
scalar head), an HF sequence-classification reward model (`policy.hf_path`, imported exactly) or another
train_rm run (`rm.init_from`). Every `rm.eval_every` optimizer steps a record (held-out pairwise accuracy
and loss, training means since the last record) goes to exp_dir/metrics.jsonl and TensorBoard; every
`rm.save_every` steps a checkpoint; at the end exp_dir/hf/final (a `*ForSequenceClassification`) and
exp_dir/COMPLETED.

The run says whether it learned anything (`verdict`): the final record, and `hf/final/optune_rm_verdict.json`
beside the export, hold `heldout_beats_chance` (a one-sided exact binomial test of the held-out pairs ranked
right against p = 1/2, alpha 0.05) and `overfit` (held-out loss rose while the loss on a fixed sample of
training pairs fell, first evaluation to last); either failing is logged as a WARNING. With
`rm.early_stopping_patience` the run ends early once the held-out loss has not improved for that many
evaluations; what is exported (and judged) is the last trained model, not the best one.

config -> the source's shape -> validate -> pairs -> (first write) -> distributed -> model -> resume -> fit.

Exit codes: as `optune_nemo.train` (its docstring; the kinds and codes are optune_nemo/errors.py): 0 done or
pre-empted, 2 bad input or an exp_dir held by another run (nothing left behind), 3 a damaged or unsafe
checkpoint file, 1 anything else.

Checkpoints (`exp_dir/checkpoints/iter_NNNNNN`, NNNNNN = optimizer steps done; `runtime/checkpoint.py`):
    reward_model.json, tokenizer/   the model's description and tokenizer (`reward_model.RewardModelMeta`)
    model/                          weights and optimizer, sharded
    trainer_state.yaml              steps done, the training means not yet recorded, the data's fingerprint
    rng_states.pt, metrics.jsonl    as in OPTune runs
"""

from __future__ import annotations

import hashlib
import logging
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from optune_nemo import runner
from optune_nemo.config import CONF_DIR, ConfigError
from optune_nemo.interfaces import Outcome
from optune_nemo.rm.config import TrainRMConfig, check_one_source, register_schema, validate
from optune_nemo.runner import (
    Assembly,
    ModelPart,
    Recipe,
    captured,
    load_tokenizer,
    run_hydra_main,
    run_in_run_dir,
    to_config,
)
from optune_nemo.runtime.rundir import world_size_from_env

log = logging.getLogger("optune_nemo.rm.train")

TRAINER_STATE = "trainer_state.yaml"


# --------------------------------------------------------------------------- the source


def resolve(cfg: TrainRMConfig) -> TrainRMConfig:
    """`cfg` with model.* replaced by the source's shape (model.seq_length stays the run's): a train_rm
    checkpoint (`rm.init_from`), an HF reward model or a causal LM (`policy.hf_path`); and precision=auto
    and parallel.use_distributed_optimizer=null decided for this machine, whatever the source. Nothing is
    written."""
    from optune_nemo.megatron.hf_rm import is_reward_model_dir, rm_model_config
    from optune_nemo.runtime.hardware import resolve_precision

    hf = cfg.policy.hf_path
    check_one_source(cfg)
    if cfg.rm.init_from is not None:
        meta = _checkpoint_meta(cfg.rm.init_from)
        return resolve_precision(replace(cfg, model=replace(meta.model, seq_length=cfg.model.seq_length)))
    if hf is not None and is_reward_model_dir(hf):
        return resolve_precision(replace(cfg, model=rm_model_config(hf, key="policy.hf_path",
                                                                    seq_length=cfg.model.seq_length, base=cfg.model)))
    return runner.resolve(cfg)


def _checkpoint_meta(init_from: str):
    from optune_nemo.megatron.reward_model import META_FILE, RewardModelMeta, find_rm_checkpoint

    ckpt = find_rm_checkpoint(init_from, key="rm.init_from")
    return RewardModelMeta.from_json((ckpt / META_FILE).read_text())


def check_inputs(cfg: TrainRMConfig, *, world_size: int) -> TrainRMConfig:
    """Everything about the configuration that can be checked before any file is written. Raises ConfigError."""
    cfg = resolve(cfg)
    validate(cfg, world_size=world_size)
    if cfg.rm.early_stopping_patience and cfg.data.eval_path is None and cfg.rm.eval_fraction == 0:
        raise ConfigError("rm.early_stopping_patience: needs held-out pairs (data.eval_path, or rm.eval_fraction > 0)")
    return cfg


@dataclass
class Source:
    """Where the reward model starts: its description, tokenizer, and the weights to load when not resuming."""

    meta: object
    """`reward_model.RewardModelMeta`."""
    tokenizer: object
    kind: str
    """`causal_lm` (backbone weights, fresh head), `hf_rm` (an HF reward model), `checkpoint` (a train_rm
    checkpoint's weights) or `random` (the tiny model of model.*)."""
    path: Path | None


def prepare_source(cfg: TrainRMConfig) -> Source:
    """The source's tokenizer and description (a GGUF is dequantised into policy.cache_dir, never exp_dir)."""
    from optune_nemo.megatron.reward_model import (
        TOKENIZER_DIR,
        RewardModelMeta,
        find_rm_checkpoint,
        load_saved_tokenizer,
    )

    if cfg.rm.init_from is not None:
        ckpt = find_rm_checkpoint(cfg.rm.init_from, key="rm.init_from")
        meta = _checkpoint_meta(cfg.rm.init_from)
        return Source(replace(meta, model=cfg.model), load_saved_tokenizer(ckpt / TOKENIZER_DIR), "checkpoint",
                      ckpt / "model")
    if cfg.policy.hf_path is None:
        tokenizer = load_tokenizer(cfg, None)
        return Source(RewardModelMeta(cfg.model, tokenizer.vocab_size, tokenizer.pad_token_id, None, None),
                      tokenizer, "random", None)
    hf_dir, kind, architecture, config = _hf_source(cfg)
    try:
        tokenizer = load_tokenizer(cfg, hf_dir)
    except (OSError, ValueError) as e:
        raise ConfigError(f"policy.hf_path: cannot load the tokenizer of {hf_dir} ({str(e).splitlines()[0]})") from None
    # an imported reward model keeps the pad id it was trained with; a fresh one pads with the tokenizer's
    pad = config.get("pad_token_id") if kind == "hf_rm" else tokenizer.pad_token_id
    return Source(RewardModelMeta(cfg.model, tokenizer.vocab_size, pad, architecture, config), tokenizer, kind, hf_dir)


def _hf_source(cfg: TrainRMConfig) -> tuple[Path, str, str, dict]:
    """(directory, kind, causal-LM architecture, config.json) of policy.hf_path."""
    from optune_nemo.megatron.hf_rm import SEQ_CLS_ARCHITECTURES, is_reward_model_dir, read_rm_config

    if is_reward_model_dir(cfg.policy.hf_path):
        hf_dir = Path(cfg.policy.hf_path).expanduser()
        config = read_rm_config(hf_dir, key="policy.hf_path")
        return hf_dir, "hf_rm", SEQ_CLS_ARCHITECTURES[config["architectures"][0]], config
    from optune_nemo.megatron.hf_import import read_hf_config

    hf_dir = runner.prepare_source(cfg)
    info = read_hf_config(hf_dir)
    return hf_dir, "causal_lm", info.architecture, info.config


def load_pairs(cfg: TrainRMConfig, tokenizer):
    """(training pairs, held-out pairs) and their fingerprint (what a resume must find unchanged)."""
    from optune_nemo.data.preferences import load_preference_pairs, split_heldout

    kw = dict(max_length=cfg.model.seq_length, overlong=cfg.rm.overlong)
    pairs = load_preference_pairs(cfg.data.path, tokenizer, key="data.path", **kw)
    if cfg.data.eval_path is not None:
        train, heldout = pairs, load_preference_pairs(cfg.data.eval_path, tokenizer, key="data.eval_path", **kw)
    else:
        f, k = cfg.rm.eval_fraction, heldout_count(len(pairs), cfg.rm.eval_fraction, cfg.rm.eval_min_pairs)
        train, heldout = split_heldout(pairs, f if k == round(f * len(pairs)) else k / len(pairs), seed=cfg.seed)
    digest = hashlib.sha256(repr(([(p.chosen, p.rejected, p.margin) for p in train],
                                  [(p.chosen, p.rejected, p.margin) for p in heldout])).encode()).hexdigest()
    log.info("%d training pairs, %d held out", len(train), len(heldout))
    return train, heldout, digest


def heldout_count(n: int, fraction: float, min_pairs: int) -> int:
    """Pairs held out of n (`rm.eval_fraction`, `rm.eval_min_pairs`): round(fraction * n), raised to
    min(min_pairs, n // 4); 0 when fraction is 0."""
    if fraction <= 0:
        return 0
    return max(round(fraction * n), min(min_pairs, n // 4))


# --------------------------------------------------------------------------- the verdict

ALPHA = 0.05
"""Significance level of the held-out test against chance."""
VERDICT_FILE = "optune_rm_verdict.json"
"""The verdict beside the export, in hf/final (`write_verdict`)."""


def binomial_tail(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2): sum_{i=k..n} C(n, i) / 2^n, the one-sided p-value of k of n held-out
    pairs ranked right under chance (a tie counts as wrong). Exact integers, one rounding at the end."""
    if not 0 <= k <= n:
        raise ValueError(f"binomial_tail: need 0 <= k <= n (got k={k}, n={n})")
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n


def overfitting(first: dict, last: dict) -> bool:
    """Over-fitting between two evaluations: the held-out loss rose while the loss on the fixed sample of
    training pairs fell (`eval_loss` and `train_eval_loss` of the two records)."""
    return last["eval_loss"] > first["eval_loss"] and last["train_eval_loss"] < first["train_eval_loss"]


def evaluations_since_best(losses: list[float]) -> int:
    """Evaluations after the first one with the lowest held-out loss (a tie is no improvement)."""
    best = min(range(len(losses)), key=lambda i: (losses[i], i)) if losses else 0
    return max(len(losses) - 1 - best, 0)


def verdict(records: list[dict]) -> dict:
    """What a run's records say about its reward model, judged on the last evaluation (the exported model):
    `heldout_p_value` = binomial_tail(eval_correct, eval_pairs), `heldout_beats_chance` = p <= ALPHA, and
    `overfit` = overfitting(first evaluation, last) (None with fewer than two evaluations or no training
    sample). {} when nothing was held out."""
    evals = [r for r in records if "eval_correct" in r]
    if not evals:
        return {}
    first, last = evals[0], evals[-1]
    p = binomial_tail(last["eval_correct"], last["eval_pairs"])
    can_tell = len(evals) >= 2 and "train_eval_loss" in first and "train_eval_loss" in last
    return {"heldout_p_value": p, "heldout_beats_chance": p <= ALPHA,
            "overfit": overfitting(first, last) if can_tell else None}


def verdict_summary(records: list[dict]) -> dict:
    """The final record's verdict with the numbers behind it (`optune_rm_verdict.json`)."""
    evals = [r for r in records if "eval_correct" in r]
    final = records[-1] if records else {}
    out = {"steps": final.get("iteration"), "early_stopped": final.get("early_stopped"),
           "heldout_pairs": evals[-1]["eval_pairs"] if evals else 0}
    if not evals:
        return {**out, "heldout_beats_chance": None, "overfit": None}
    first, last = evals[0], evals[-1]
    return {**out, "heldout_correct": last["eval_correct"], "heldout_accuracy": last["eval_accuracy"],
            **verdict(records), "alpha": ALPHA,
            "test": "one-sided exact binomial test of heldout_correct of heldout_pairs against p = 1/2",
            "eval_loss_first_last": [first["eval_loss"], last["eval_loss"]],
            "train_eval_loss_first_last": [first.get("train_eval_loss"), last.get("train_eval_loss")]}


def warn_verdict(summary: dict) -> None:
    """The WARNING lines of a run whose reward model has not shown that it ranks unseen pairs."""
    if not summary["heldout_pairs"]:
        log.warning("no held-out pairs (rm.eval_fraction=0 and no data.eval_path): nothing shows that this reward "
                    "model ranks unseen pairs better than chance")
        return
    if not summary["heldout_beats_chance"]:
        log.warning("held-out accuracy %.3f (%d of %d pairs) does not beat chance (one-sided binomial p = %.3g > "
                    "%g): this reward model has not learned the preference; a policy tuned on it optimises noise "
                    "(docs/reward_models.md: more pairs, a larger backbone)", summary["heldout_accuracy"],
                    summary["heldout_correct"], summary["heldout_pairs"], summary["heldout_p_value"], ALPHA)
    if summary["overfit"]:
        (e0, e1), (t0, t1) = summary["eval_loss_first_last"], summary["train_eval_loss_first_last"]
        log.warning("over-fitting: held-out loss rose %.4f -> %.4f while the loss on training pairs fell %.4f -> "
                    "%.4f (fewer epochs, rm.early_stopping_patience, or more pairs)", e0, e1, t0, t1)


def write_verdict(export_dir: Path, summary: dict) -> None:
    from optune_nemo.runtime.fileio import write_json_atomic

    write_json_atomic(Path(export_dir) / VERDICT_FILE, summary)


def training_sample(train: list, k: int, *, seed: int) -> list:
    """k training pairs (all when fewer), drawn once with a generator seeded by (seed, "rm_train_sample"), in
    file order: their loss, measured at every evaluation, is the training side of `overfitting`."""
    from optune_nemo.runtime.seeding import generator

    if k >= len(train):
        return list(train)
    chosen = set(torch.randperm(len(train), generator=generator(seed, "rm_train_sample"))[:k].tolist())
    return [p for i, p in enumerate(train) if i in chosen]


# --------------------------------------------------------------------------- the trainer


@dataclass
class Pending:
    """Training means not yet written to a record: sums weighted by each step's pairs."""

    pairs: int = 0
    steps: int = 0
    sums: dict = field(default_factory=dict)
    grad_norm: float = 0.0

    def add(self, step: dict) -> None:
        from optune_nemo.megatron.reward_model import TRAIN_METRICS

        n = step["num_pairs"]
        self.pairs, self.steps = self.pairs + n, self.steps + 1
        for k in TRAIN_METRICS:
            self.sums[k] = self.sums.get(k, 0.0) + step[k] * n
        self.grad_norm += step["grad_norm"]

    def means(self) -> dict:
        if not self.steps:
            return {}
        out = {f"train_{k}": v / max(self.pairs, 1) for k, v in self.sums.items()}
        return {**out, "grad_norm": self.grad_norm / self.steps}


class RMTrainer:
    """Optimizer steps over the training pairs, held-out evaluation, records and checkpoints. Also the
    `trainer` checkpoint part (`trainer_state.yaml`: YAML, nothing pickled)."""

    def __init__(self, cfg: TrainRMConfig, *, model, tokenizer, train, heldout, data_digest: str, metrics,
                 checkpoints, guard):
        self.cfg, self.model, self.tokenizer, self.train, self.heldout = cfg, model, tokenizer, train, heldout
        self.metrics, self.checkpoints, self.guard = metrics, checkpoints, guard
        self.data_digest = data_digest
        self.steps_per_epoch = math.ceil(len(train) / cfg.rm.global_batch_size)
        self.total_steps = cfg.rm.epochs * self.steps_per_epoch
        self.scheduler = model.scheduler(self.total_steps)
        self.step = 0
        self.pending = Pending()
        self._orders: dict[int, list[int]] = {}
        self._tic = time.perf_counter()
        self.train_sample = training_sample(train, len(heldout), seed=cfg.seed)

    # ------------------------------------------------------------------ the loop

    def batch(self, step: int) -> list[int]:
        """Indices of the pairs of optimizer step `step` (0-based): epoch-wise, seeded shuffles."""
        from optune_nemo.runtime.seeding import generator

        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch not in self._orders:
            n = len(self.train)
            self._orders = {epoch: torch.randperm(n, generator=generator(self.cfg.seed, "rm_epoch", epoch)).tolist()
                            if self.cfg.rm.shuffle else list(range(n))}
        G = self.cfg.rm.global_batch_size
        return self._orders[epoch][k * G:(k + 1) * G]

    def fit(self) -> Outcome:
        """COMPLETED (after rm.epochs, or early: rm.early_stopping_patience) or PREEMPTED."""
        from optune_nemo.runtime.console import progress

        r = self.cfg.rm
        if self.step == 0 and self.heldout:
            self._record()
        if r.early_stopping_patience and self.metrics.records and self.metrics.records[-1].get("early_stopped"):
            return Outcome.COMPLETED                      # resumed from the final checkpoint of a run stopped early
        steps = progress(range(self.step, self.total_steps), desc="train_rm", total=self.total_steps - self.step,
                         enabled=self.cfg.logging.progress)
        for _ in steps:
            out = self.model.train_pairs(self.train, self.batch(self.step), micro_batch_size=r.micro_batch_size,
                                         scheduler=self.scheduler)
            self.step += 1
            self.pending.add(out)
            recorded = self.step % r.eval_every == 0 or self.step == self.total_steps
            if recorded:
                self._record(lr=out["lr"])
            last = self.step == self.total_steps or (recorded and self._patience_spent())
            if last:
                self._conclude()
            stop = not last and self.guard.requested()
            if self.cfg.checkpoint.save and (last or stop or (r.save_every and self.step % r.save_every == 0)):
                self.checkpoints.save(self.step)          # the records are part of the checkpoint
            if recorded:
                self.metrics.flush()
            if stop:
                return Outcome.PREEMPTED
            if last:
                break
        return Outcome.COMPLETED

    def _patience_spent(self) -> bool:
        losses = [rec["eval_loss"] for rec in self.metrics.records if "eval_loss" in rec]
        patience = self.cfg.rm.early_stopping_patience
        return bool(patience) and evaluations_since_best(losses) >= patience

    def _conclude(self) -> None:
        """The final record also gets `early_stopped` and the run's `verdict`."""
        final = self.metrics.records[-1]
        assert final["iteration"] == self.step, "the last step is always recorded"
        final.update(early_stopped=self.step < self.total_steps, **verdict(self.metrics.records))
        if final["early_stopped"]:
            log.info("early stop after step %d/%d: held-out loss not below its best for %d evaluations",
                     self.step, self.total_steps, self.cfg.rm.early_stopping_patience)

    def evaluate(self) -> dict:
        """Held-out pairwise accuracy (chosen scored above rejected: `eval_correct` of `eval_pairs`), Bradley-Terry
        loss and mean margin; and the loss and accuracy on a fixed sample of as many training pairs
        (`train_eval_*`, measured on the same model as the held-out numbers: the training side of `overfitting`)."""
        out = {f"eval_{k}": v for k, v in self._pair_metrics(self.heldout).items()}
        out["eval_pairs"] = len(self.heldout)
        if self.train_sample:
            sample = self._pair_metrics(self.train_sample)
            out.update(train_eval_loss=sample["loss"], train_eval_accuracy=sample["accuracy"])
        return out

    def _pair_metrics(self, pairs) -> dict:
        from optune_nemo.losses.bradley_terry import bradley_terry_per_pair

        n = len(pairs)
        scores = self.model.score([p.chosen for p in pairs] + [p.rejected for p in pairs],
                                  rows=2 * self.cfg.rm.micro_batch_size).double()
        chosen, rejected = scores[:n], scores[n:]
        margin = torch.tensor([p.margin for p in pairs], dtype=torch.float64)
        right = chosen > rejected
        return {"loss": float(bradley_terry_per_pair(chosen, rejected, margin).mean()),
                "accuracy": float(right.double().mean()), "margin": float((chosen - rejected).mean()),
                "correct": int(right.sum())}

    def _record(self, lr: float | None = None) -> None:
        record = {"iteration": self.step, "epoch": self.step / self.steps_per_epoch, **self.pending.means()}
        if lr is not None:
            record["lr"] = lr
        if self.heldout:
            record.update(self.evaluate())
            log.info("step %d/%d: held-out accuracy %.3f, loss %.4f%s", self.step, self.total_steps,
                     record["eval_accuracy"], record["eval_loss"],
                     f", training loss {record['train_loss']:.4f}" if "train_loss" in record else "")
        now = time.perf_counter()
        record["time_s"] = now - self._tic
        self._tic = now
        self.pending = Pending()
        self.metrics.add(record)

    # ------------------------------------------------------------------ checkpoint part

    def save(self, directory: Path) -> None:
        from optune_nemo.runtime.distributed import global_rank
        from optune_nemo.runtime.fileio import write_text_atomic

        if global_rank() == 0:
            p = self.pending
            # floats are written as repr: they read back bitwise (an exact resume needs the pending sums)
            state = {"step": self.step, "data": self.data_digest,
                     "pending": {"pairs": p.pairs, "steps": p.steps, "sums": dict(p.sums), "grad_norm": p.grad_norm},
                     "config": OmegaConf.to_container(OmegaConf.structured(self.cfg))}
            write_text_atomic(Path(directory) / TRAINER_STATE, OmegaConf.to_yaml(OmegaConf.create(state)))

    def load(self, directory: Path) -> None:
        state = read_trainer_state(directory)
        if state["data"] != self.data_digest:
            raise ConfigError(f"data.path: the preference pairs differ from those of checkpoint {directory} "
                              "(data.path, data.eval_path, rm.eval_fraction, rm.eval_min_pairs, rm.overlong, "
                              "model.seq_length and seed decide them); use another exp_dir or resume=never")
        self.step = int(state["step"])
        p = state["pending"]
        self.pending = Pending(int(p["pairs"]), int(p["steps"]), {k: float(v) for k, v in p["sums"].items()},
                               float(p["grad_norm"]))
        self.scheduler.step(increment=self.step)    # the LR is a function of the steps done


def read_trainer_state(directory: Path) -> dict:
    """The trainer state of a checkpoint (YAML: nothing unpickled)."""
    from optune_nemo.runtime.checkpoint import CheckpointError

    path = Path(directory) / TRAINER_STATE
    try:
        state = OmegaConf.to_container(OmegaConf.load(path))
        missing = {"step", "data", "pending"} - set(state)
        if missing:
            raise KeyError(", ".join(sorted(missing)))
        return state
    except Exception as e:   # missing file, bad YAML, missing keys
        raise CheckpointError(f"{path}: not a readable train_rm state ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None


class MetaPart:
    """The model's description and tokenizer (`reward_model.json`, `tokenizer/`): what makes a checkpoint
    usable on its own (`reward.type=megatron`, `rm.init_from`). Restoring checks that it describes this run's model."""

    def __init__(self, meta, tokenizer):
        self.meta, self.tokenizer = meta, tokenizer

    def save(self, directory: Path) -> None:
        from optune_nemo.runtime.distributed import global_rank

        if global_rank() == 0:
            self.meta.save(directory, self.tokenizer)

    def load(self, directory: Path) -> None:
        from optune_nemo.megatron.reward_model import META_FILE, RewardModelMeta

        saved = RewardModelMeta.from_json((Path(directory) / META_FILE).read_text())
        if _shape(saved) != _shape(self.meta):
            raise ConfigError(f"policy.hf_path: checkpoint {directory} holds another model than this run's source; "
                              "use another exp_dir or resume=never")


def _shape(meta) -> tuple:
    """What decides a checkpoint's tensors (not model.seq_length, nor the initialisation)."""
    m = meta.model
    return (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups,
            m.kv_channels, m.add_qkv_bias, m.make_vocab_size_divisible_by, m.transformer_impl, meta.vocab_size)


# --------------------------------------------------------------------------- assembly


def load_source_weights(model, source: Source) -> None:
    if source.kind == "causal_lm":
        model.load_hf_backbone(source.path)
    elif source.kind == "hf_rm":
        model.load_hf_reward_model(source.path)
    elif source.kind == "checkpoint":
        model.load_weights(source.path)


@dataclass
class RewardModelRun(Recipe):
    """A train_rm run: the trainer-specific part the runner builds (`runner.Recipe`); once built, `trainer`
    is ready to `fit`. `cfg` has passed `check_inputs`; the source and the pairs are read before exp_dir is
    first written."""

    cfg: TrainRMConfig
    source: Source | None = None
    pairs: tuple = ()
    """(training pairs, held-out pairs, their fingerprint): `load_pairs`."""
    model: object = None
    """`megatron.reward_model.MegatronRewardModel`."""
    trainer: RMTrainer | None = None
    summary: dict = field(default_factory=dict)
    """`verdict_summary` of the finished run."""
    log = log

    def prepare(self) -> int:
        from optune_nemo.megatron.parallel import init_distributed
        from optune_nemo.megatron.reward_model import build_reward_model

        cfg, p = self.cfg, self.cfg.parallel
        self.source = prepare_source(cfg)
        self.pairs = load_pairs(cfg, self.source.tokenizer)
        dist = init_distributed(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                timeout_minutes=p.distributed_timeout_minutes)
        self.model = build_reward_model(self.source.meta, dist=dist, optim=cfg.optim, precision=cfg.precision,
                                        use_distributed_optimizer=p.use_distributed_optimizer, seed=cfg.seed)
        return dist.rank

    def assemble(self, *, guard, metrics, checkpoints) -> Assembly:
        train, heldout, digest = self.pairs
        self.trainer = RMTrainer(self.cfg, model=self.model, tokenizer=self.source.tokenizer, train=train,
                                 heldout=heldout, data_digest=digest, metrics=metrics, checkpoints=checkpoints,
                                 guard=guard)
        return Assembly(self.trainer, {"reward_model": MetaPart(self.source.meta, self.source.tokenizer),
                                       "model": ModelPart(self.model)})

    def begin(self, restored: Path | None) -> None:
        if restored is None:
            load_source_weights(self.model, self.source)

    def finish(self) -> None:
        """The export (hf/final, when the model has an HF architecture) and, beside it, the verdict."""
        exp_dir = Path(self.cfg.exp_dir)
        self.summary = verdict_summary(self.trainer.metrics.records)
        exported = self.cfg.policy.export_hf_final and self.model.meta.architecture is not None
        if exported:
            self.model.export_hf(exp_dir / "hf" / "final", tokenizer=self.trainer.tokenizer)
        elif self.cfg.policy.export_hf_final:
            log.info("no Hugging Face export: the tiny model with the byte tokenizer has no HF architecture")
        if exported and self.model.dist.rank == 0:
            write_verdict(exp_dir / "hf" / "final", self.summary)

    def summarize(self) -> None:
        summarize(Path(self.cfg.exp_dir))
        warn_verdict(self.summary)


def build_trainer(cfg: TrainRMConfig) -> RMTrainer:
    """Every component, and resume (`runner.build`): the trainer ready to `fit()`. `cfg` has passed
    `check_inputs`."""
    run = RewardModelRun(cfg)
    runner.build(run)
    return run.trainer


def run_training(cfg: TrainRMConfig) -> Outcome:
    """Everything after validation (`runner.run_training`): COMPLETED or PREEMPTED."""
    return runner.run_training(RewardModelRun(cfg))


def summarize(exp_dir: Path) -> None:
    from optune_nemo.runtime.metrics import read_metrics

    evals = [r for r in read_metrics(exp_dir) if "eval_correct" in r]
    if len(evals) >= 2:
        last = evals[-1]
        log.info("done: held-out accuracy %.3f -> %.3f (%d of %d right, p = %.3g against chance), loss %.4f -> "
                 "%.4f", evals[0]["eval_accuracy"], last["eval_accuracy"], last["eval_correct"], last["eval_pairs"],
                 binomial_tail(last["eval_correct"], last["eval_pairs"]), evals[0]["eval_loss"], last["eval_loss"])


# --------------------------------------------------------------------------- command line


register_schema()


@hydra.main(config_path=str(CONF_DIR), config_name="train_rm", version_base=None)
@captured
def _hydra_main(dcfg: DictConfig) -> None:
    cfg = check_inputs(to_config(dcfg, TrainRMConfig), world_size=world_size_from_env())
    run_in_run_dir(RewardModelRun(cfg))


def main() -> int:
    """`python -m optune_nemo.train_rm`: Hydra's command line with this module's exit codes (docstring)."""
    return run_hydra_main(_hydra_main, prog="optune_nemo.rm.train", schema=TrainRMConfig)


if __name__ == "__main__":
    sys.exit(main())
