"""Hydra entry point: `python -m optune_nemo.train_rm data.path=prefs.jsonl key=value ...`.

Trains a Bradley-Terry reward model (paper eq. 1; `policy/reward_model.py`) on preference pairs
(`data/preferences.py`), starting from a causal LM (`policy.hf_path`: HF directory, .gguf, smollm2; a fresh
scalar head), an HF sequence-classification reward model (`policy.hf_path`, imported exactly) or another
train_rm run (`rm.init_from`). Every `rm.eval_every` optimizer steps a record (held-out pairwise accuracy
and loss, training means since the last record) goes to exp_dir/metrics.jsonl and TensorBoard; every
`rm.save_every` steps a checkpoint; at the end exp_dir/hf/final (a `*ForSequenceClassification`) and
exp_dir/COMPLETED.

config -> the source's shape -> validate -> pairs -> (first write) -> distributed -> model -> resume -> fit.

Exit codes (as `optune_nemo.train`):
  0  finished, or stopped cleanly for pre-emption (then `exp_dir/COMPLETED` is absent);
  2  the user's configuration or files are wrong: one line on stderr naming the key or file, and nothing
     this invocation created is left in exp_dir (everything checkable is checked before the first write);
  1  anything else (a traceback).

Checkpoints (`exp_dir/checkpoints/iter_NNNNNN`, NNNNNN = optimizer steps done; `checkpoint.py`):
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

from optune_nemo.cli import captured, run_hydra_main
from optune_nemo.config import CONF_DIR, ConfigError
from optune_nemo.config_rm import TrainRMConfig, check_one_source, config_to_yaml, register_schema, validate
from optune_nemo.rundir import RunDir, rank_from_env, world_size_from_env

log = logging.getLogger("optune_nemo.train_rm")

COMPLETED = "COMPLETED"
TRAINER_STATE = "trainer_state.yaml"


def to_config(dcfg: DictConfig) -> TrainRMConfig:
    cfg = OmegaConf.to_object(dcfg)
    assert isinstance(cfg, TrainRMConfig)
    return cfg


# --------------------------------------------------------------------------- the source


def resolve(cfg: TrainRMConfig) -> TrainRMConfig:
    """`cfg` with model.* replaced by the source's shape (model.seq_length stays the run's): a train_rm
    checkpoint (`rm.init_from`), an HF reward model or a causal LM (`policy.hf_path`); and precision=auto
    and parallel.use_distributed_optimizer=null decided for this machine, whatever the source. Nothing is
    written."""
    from optune_nemo.build import resolve as resolve_policy_source
    from optune_nemo.config import resolve_precision
    from optune_nemo.policy.hf_rm import is_reward_model_dir, rm_model_config

    hf = cfg.policy.hf_path
    check_one_source(cfg)
    if cfg.rm.init_from is not None:
        meta = _checkpoint_meta(cfg.rm.init_from)
        return resolve_precision(replace(cfg, model=replace(meta.model, seq_length=cfg.model.seq_length)))
    if hf is not None and is_reward_model_dir(hf):
        return resolve_precision(replace(cfg, model=rm_model_config(hf, key="policy.hf_path",
                                                                    seq_length=cfg.model.seq_length, base=cfg.model)))
    return resolve_policy_source(cfg)


def _checkpoint_meta(init_from: str):
    from optune_nemo.policy.reward_model import META_FILE, RewardModelMeta, find_rm_checkpoint

    ckpt = find_rm_checkpoint(init_from, key="rm.init_from")
    return RewardModelMeta.from_json((ckpt / META_FILE).read_text())


def check_inputs(cfg: TrainRMConfig, *, world_size: int) -> TrainRMConfig:
    """Everything about the configuration that can be checked before any file is written. Raises ConfigError."""
    cfg = resolve(cfg)
    validate(cfg, world_size=world_size)
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
    from optune_nemo.build import load_tokenizer
    from optune_nemo.policy.reward_model import TOKENIZER_DIR, RewardModelMeta, find_rm_checkpoint, load_saved_tokenizer

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
    from optune_nemo.policy.hf_rm import SEQ_CLS_ARCHITECTURES, is_reward_model_dir, read_rm_config

    if is_reward_model_dir(cfg.policy.hf_path):
        hf_dir = Path(cfg.policy.hf_path).expanduser()
        config = read_rm_config(hf_dir, key="policy.hf_path")
        return hf_dir, "hf_rm", SEQ_CLS_ARCHITECTURES[config["architectures"][0]], config
    from optune_nemo.build import prepare_source as prepare_policy_source
    from optune_nemo.policy.hf_import import read_hf_config

    hf_dir = prepare_policy_source(cfg)
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
        train, heldout = split_heldout(pairs, cfg.rm.eval_fraction, seed=cfg.seed)
    digest = hashlib.sha256(repr(([(p.chosen, p.rejected, p.margin) for p in train],
                                  [(p.chosen, p.rejected, p.margin) for p in heldout])).encode()).hexdigest()
    log.info("%d training pairs, %d held out", len(train), len(heldout))
    return train, heldout, digest


# --------------------------------------------------------------------------- the trainer


@dataclass
class Pending:
    """Training means not yet written to a record: sums weighted by each step's pairs."""

    pairs: int = 0
    steps: int = 0
    sums: dict = field(default_factory=dict)
    grad_norm: float = 0.0

    def add(self, step: dict) -> None:
        from optune_nemo.policy.reward_model import TRAIN_METRICS

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

    # ------------------------------------------------------------------ the loop

    def batch(self, step: int) -> list[int]:
        """Indices of the pairs of optimizer step `step` (0-based): epoch-wise, seeded shuffles."""
        from optune_nemo.seeding import generator

        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch not in self._orders:
            n = len(self.train)
            self._orders = {epoch: torch.randperm(n, generator=generator(self.cfg.seed, "rm_epoch", epoch)).tolist()
                            if self.cfg.rm.shuffle else list(range(n))}
        G = self.cfg.rm.global_batch_size
        return self._orders[epoch][k * G:(k + 1) * G]

    def fit(self) -> str:
        """Returns `completed` or `preempted`."""
        from optune_nemo.console import progress

        r = self.cfg.rm
        if self.step == 0 and self.heldout:
            self._record()
        steps = progress(range(self.step, self.total_steps), desc="train_rm", total=self.total_steps - self.step,
                         enabled=self.cfg.logging.progress)
        for _ in steps:
            out = self.model.train_pairs(self.train, self.batch(self.step), micro_batch_size=r.micro_batch_size,
                                         scheduler=self.scheduler)
            self.step += 1
            self.pending.add(out)
            last = self.step == self.total_steps
            recorded = self.step % r.eval_every == 0 or last
            if recorded:
                self._record(lr=out["lr"])
            stop = not last and self.guard.requested()
            if self.cfg.checkpoint.save and (last or stop or (r.save_every and self.step % r.save_every == 0)):
                self.checkpoints.save(self.step)          # the records are part of the checkpoint
            if recorded:
                self.metrics.flush()
            if stop:
                return "preempted"
        return "completed"

    def evaluate(self) -> dict:
        """Held-out pairwise accuracy (chosen scored above rejected), Bradley-Terry loss and mean margin."""
        from optune_nemo.losses.bradley_terry import bradley_terry_per_pair

        n = len(self.heldout)
        scores = self.model.score([p.chosen for p in self.heldout] + [p.rejected for p in self.heldout],
                                  rows=2 * self.cfg.rm.micro_batch_size).double()
        chosen, rejected = scores[:n], scores[n:]
        margin = torch.tensor([p.margin for p in self.heldout], dtype=torch.float64)
        return {"eval_loss": float(bradley_terry_per_pair(chosen, rejected, margin).mean()),
                "eval_accuracy": float((chosen > rejected).double().mean()),
                "eval_margin": float((chosen - rejected).mean()), "eval_pairs": n}

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
        from optune_nemo.distributed import global_rank
        from optune_nemo.fileio import write_text_atomic

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
                              "(data.path, data.eval_path, rm.eval_fraction, rm.overlong, model.seq_length and "
                              "seed decide them); use another exp_dir or resume=never")
        self.step = int(state["step"])
        p = state["pending"]
        self.pending = Pending(int(p["pairs"]), int(p["steps"]), {k: float(v) for k, v in p["sums"].items()},
                               float(p["grad_norm"]))
        self.scheduler.step(increment=self.step)    # the LR is a function of the steps done


def read_trainer_state(directory: Path) -> dict:
    """The trainer state of a checkpoint (YAML: nothing unpickled)."""
    from optune_nemo.checkpoint import CheckpointError

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
        from optune_nemo.distributed import global_rank

        if global_rank() == 0:
            self.meta.save(directory, self.tokenizer)

    def load(self, directory: Path) -> None:
        from optune_nemo.policy.reward_model import META_FILE, RewardModelMeta

        saved = RewardModelMeta.from_json((Path(directory) / META_FILE).read_text())
        if _shape(saved) != _shape(self.meta):
            raise ConfigError(f"policy.hf_path: checkpoint {directory} holds another model than this run's source; "
                              "use another exp_dir or resume=never")


def _shape(meta) -> tuple:
    """What decides a checkpoint's tensors (not model.seq_length, nor the initialisation)."""
    m = meta.model
    return (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups,
            m.kv_channels, m.add_qkv_bias, m.make_vocab_size_divisible_by, m.transformer_impl, meta.vocab_size)


class ModelPart:
    """The reward model's weights and optimizer, sharded, under `model/`."""

    def __init__(self, model):
        self.model = model

    def save(self, directory: Path) -> None:
        self.model.save_checkpoint(str(Path(directory) / "model"))

    def load(self, directory: Path) -> None:
        self.model.load_checkpoint(str(Path(directory) / "model"))


# --------------------------------------------------------------------------- assembly


def resume(cfg: TrainRMConfig, checkpoints) -> Path | None:
    """Restore the newest complete checkpoint (per `resume`); returns it, or None to start fresh."""
    if cfg.resume == "never":
        if checkpoints.complete_checkpoints():
            raise ConfigError(f"resume: never, but {checkpoints.root} already holds checkpoints; "
                              "use resume=auto or another exp_dir")
        return None
    directory = Path(cfg.resume) if cfg.resume != "auto" else checkpoints.latest_valid()
    if directory is None:
        return None
    log.info("resuming from %s", directory)
    checkpoints.restore(directory)
    return directory


def load_source_weights(model, source: Source) -> None:
    if source.kind == "causal_lm":
        model.load_hf_backbone(source.path)
    elif source.kind == "hf_rm":
        model.load_hf_reward_model(source.path)
    elif source.kind == "checkpoint":
        model.load_weights(source.path)


def build_trainer(cfg: TrainRMConfig) -> RMTrainer:
    """Every component, and resume: the trainer ready to `fit()`. `cfg` has passed `check_inputs`; the
    source and the pairs are read before exp_dir is first written."""
    from optune_nemo.checkpoint import CheckpointManager, RngStates
    from optune_nemo.console import setup_logging
    from optune_nemo.metrics import MetricsWriter
    from optune_nemo.policy.parallel import init_distributed
    from optune_nemo.policy.reward_model import build_reward_model
    from optune_nemo.preemption import PreemptionGuard

    guard = PreemptionGuard()   # first: a signal during start-up must not kill the job
    setup_logging(rank_from_env(), cfg.logging.level)
    source = prepare_source(cfg)
    train, heldout, digest = load_pairs(cfg, source.tokenizer)
    p = cfg.parallel
    dist = init_distributed(p.tensor_model_parallel_size, p.pipeline_model_parallel_size)
    model = build_reward_model(source.meta, dist=dist, optim=cfg.optim, precision=cfg.precision,
                               use_distributed_optimizer=p.use_distributed_optimizer, seed=cfg.seed)
    exp_dir = Path(cfg.exp_dir)
    if dist.rank == 0:                 # the first write of the run
        exp_dir.mkdir(parents=True, exist_ok=True)
        (exp_dir / "config.yaml").write_text(config_to_yaml(cfg))
    metrics = MetricsWriter(exp_dir, tensorboard=cfg.logging.tensorboard, enabled=dist.rank == 0)
    checkpoints = CheckpointManager(exp_dir, keep_last=cfg.checkpoint.keep_last)
    trainer = RMTrainer(cfg, model=model, tokenizer=source.tokenizer, train=train, heldout=heldout,
                        data_digest=digest, metrics=metrics, checkpoints=checkpoints, guard=guard)
    checkpoints.register("reward_model", MetaPart(source.meta, source.tokenizer))
    checkpoints.register("model", ModelPart(model))
    checkpoints.register("trainer", trainer)
    checkpoints.register("rng", RngStates())
    checkpoints.register("metrics", metrics)
    if not resume(cfg, checkpoints):
        metrics.start_fresh()
        load_source_weights(model, source)
    return trainer


def run_training(cfg: TrainRMConfig) -> str:
    """Everything after validation. Returns `completed` or `preempted`."""
    trainer = build_trainer(cfg)
    exp_dir, rank = Path(cfg.exp_dir), trainer.model.dist.rank
    outcome = trainer.fit()
    trainer.metrics.close()
    if outcome != "completed":
        return outcome
    if cfg.policy.export_hf_final and trainer.model.meta.architecture is not None:
        trainer.model.export_hf(exp_dir / "hf" / "final", tokenizer=trainer.tokenizer)
    elif cfg.policy.export_hf_final:
        log.info("no Hugging Face export: the tiny model with the byte tokenizer has no HF architecture")
    if rank == 0:
        (exp_dir / COMPLETED).write_text("ok\n")
        summarize(exp_dir)
    return outcome


def summarize(exp_dir: Path) -> None:
    from optune_nemo.metrics import read_metrics

    evals = [r for r in read_metrics(exp_dir) if "eval_accuracy" in r]
    if len(evals) >= 2:
        log.info("done: held-out accuracy %.3f -> %.3f, loss %.4f -> %.4f (%d pairs)", evals[0]["eval_accuracy"],
                 evals[-1]["eval_accuracy"], evals[0]["eval_loss"], evals[-1]["eval_loss"], evals[-1]["eval_pairs"])


# --------------------------------------------------------------------------- command line


register_schema()


@hydra.main(config_path=str(CONF_DIR), config_name="train_rm", version_base=None)
@captured
def _hydra_main(dcfg: DictConfig) -> None:
    cfg = check_inputs(to_config(dcfg), world_size=world_size_from_env())
    with RunDir(cfg.exp_dir, rank=rank_from_env()):
        run_training(cfg)


def main() -> int:
    """`python -m optune_nemo.train_rm`: Hydra's command line with this module's exit codes (docstring)."""
    return run_hydra_main(_hydra_main, prog="optune_nemo.train_rm", schema=TrainRMConfig)


if __name__ == "__main__":
    sys.exit(main())
