"""What every trainer shares (OPTune, `train.py`; the reward model, `rm/train.py`): the Hydra entry point's
exit codes and one-line errors, the run itself (guard, logging, run directory, checkpoint parts, resume,
the end of a run), and the model source both read.

A run, as `run_training` drives it for a trainer-specific `Recipe`:

    PreemptionGuard -> logging -> recipe.prepare()   every input read and checked; nothing written
    -> exp_dir's lock, exp_dir/config.yaml, exp_dir/logs   the first write (`open_run_dir`)
    -> metrics, checkpoints -> recipe.assemble()      the trainer and its checkpoint parts
    -> CheckpointManager.start (resume, or recipe.init_from(), or a fresh start) -> recipe.begin()
    -> trainer.fit() -> when completed: recipe.finish(), exp_dir/COMPLETED, recipe.summarize()

Hydra reports its own errors (an unknown key, a value of the wrong type, a malformed override) on
several lines and exits with 1. `run_hydra_main` makes them propagate (HYDRA_FULL_ERROR) and turns
them, and every `ConfigError` raised by the program, into one line naming the key, with exit code 2;
the other error kinds of `optune_nemo.errors` get their own one line and exit code.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import logging
import os
import sys
import typing
from pathlib import Path

from optune_nemo.errors import EXIT_CHECKPOINT, EXIT_USER, CheckpointError, ConfigError, RunDirBusy, StorageError
from optune_nemo.runtime.rundir import RunDir, hold_run_dir, rank_from_env

if typing.TYPE_CHECKING:     # imported where used: `--help` and a refused configuration stay quick (no torch)
    from optune_nemo.interfaces import Outcome
    from optune_nemo.runtime.checkpoint import CheckpointManager, CheckpointPart
    from optune_nemo.runtime.metrics import MetricsWriter
    from optune_nemo.runtime.preemption import PreemptionGuard

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- exit codes and one-line errors


def _fields_under(schema, dotted: str) -> list[str] | None:
    """The keys allowed under `dotted` (a section of the schema), or None when it is no section."""
    node = schema
    for part in [p for p in dotted.split(".") if p]:
        hints = typing.get_type_hints(node)
        if part not in hints or not dataclasses.is_dataclass(hints[part]):
            return None
        node = hints[part]
    return [f.name for f in dataclasses.fields(node)]


def config_error_line(e: BaseException, schema) -> str | None:
    """One line for a Hydra / OmegaConf error about the configuration, or None for other errors."""
    from hydra.errors import HydraException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    for ex in (e, e.__cause__):
        if isinstance(ex, OmegaConfBaseException) and getattr(ex, "full_key", None):
            key = ex.full_key
            if isinstance(ex, (ConfigAttributeError, ConfigKeyError)):
                parent = key.rpartition(".")[0]
                allowed = _fields_under(schema, parent)
                where = f"under {parent}" if parent else "at the top level"
                return f"{key}: unknown key" + (f" (keys {where}: {', '.join(allowed)})" if allowed else "")
            return f"{key}: {str(ex.msg).splitlines()[0]}"
    if isinstance(e, (HydraException, OmegaConfBaseException)):
        return str(e).splitlines()[0]
    return None


_CAPTURED: list[BaseException] = []


def captured(fn):
    """Wrap a Hydra task function so its exception is kept for `run_hydra_main` instead of going through
    Hydra's job runner (which prints the job's overrides before re-raising). Apply under `@hydra.main`."""
    @functools.wraps(fn)
    def task(dcfg):
        try:
            return fn(dcfg)
        except BaseException as e:
            _CAPTURED.append(e)
    return task


def run_hydra_main(task, *, prog: str, schema=None) -> int:
    """Run a `@hydra.main` function (its body wrapped in `captured`); returns the exit code (0, 2 for the
    user's input, 1 otherwise)."""
    os.environ["HYDRA_FULL_ERROR"] = "1"      # errors reach us instead of Hydra's multi-line report
    from optune_nemo.runtime.console import hold_early_records

    hold_early_records()                      # log records and warnings before the logging set-up: kept
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if rank_from_env() == 0 else (lambda line: None)
    try:
        return _run(task, say, schema, prog)
    finally:
        _close_process_group()


_PEER_SIGNS = ("Timed out", "Connection closed by peer", "Connection reset by peer", "Broken pipe",
               "Socket Timeout", "NCCL communicator was aborted")


def peer_failure(e: BaseException) -> str | None:
    """One line for a collective that failed because another rank died or hung (gloo / NCCL errors in a
    job of several processes), else None."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    text = str(e).splitlines()[0] if str(e) else ""
    if not isinstance(e, RuntimeError) or not any(sign in str(e) for sign in _PEER_SIGNS):
        return None
    return (f"another rank of the job died or did not answer within parallel.distributed_timeout_minutes "
            f"({type(e).__name__}: {text[:300]}); the job stops, rerun the same command to resume")


def _close_process_group() -> None:
    """Leave torch.distributed cleanly: NCCL otherwise warns at exit, after our last line."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _run(task, say, schema, prog: str) -> int:
    from optune_nemo.config import OptuneNemoConfig
    from optune_nemo.errors import RewardError

    try:
        task()
        if _CAPTURED:
            raise _CAPTURED.pop()
    except SystemExit as e:                   # --help, --cfg, and Hydra's own usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except ConfigError as e:
        say(f"{prog}: configuration error: {e}")
        return EXIT_USER
    except RunDirBusy as e:       # another run holds exp_dir: nothing was written
        say(f"{prog}: error: {e}")
        return EXIT_USER
    except CheckpointError as e:  # damaged or unsafe checkpoint file: nothing was loaded from it
        say(f"{prog}: checkpoint error: {e}")
        return EXIT_CHECKPOINT
    except RewardError as e:      # a reward service down, or a reward model failing (RewardUnavailable too)
        say(f"{prog}: error: {e} (everything generated so far is kept: rerun the same command to resume)")
        return 1
    except StorageError as e:     # no room for the next checkpoint: the earlier ones are intact
        say(f"{prog}: error: {e}")
        return 1
    except Exception as e:
        line = config_error_line(e, schema or OptuneNemoConfig)
        if line is None:
            peer = peer_failure(e)
            if peer is None:
                raise
            # every rank says it (rank 0 may be the one that died), each once
            print(f"{prog}: error on rank {rank_from_env()}: {peer}", file=sys.stderr, flush=True)
            return 1
        say(f"{prog}: configuration error: {line}")
        return 2
    return 0


def to_config(dcfg, schema: type):
    """The typed configuration (an instance of the `schema` dataclass) of Hydra's DictConfig."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_object(dcfg)
    assert isinstance(cfg, schema)
    return cfg


# --------------------------------------------------------------------------- the run

COMPLETED = "COMPLETED"
"""exp_dir/COMPLETED: written (on rank 0) when a run finished; absent after a pre-emption."""


class Trainer(typing.Protocol):
    """What the runner drives: `fit`, and the trainer's own state as the `trainer` checkpoint part."""

    def fit(self) -> Outcome:
        """Train from where the checkpoint left off until done, or until a pre-emption request."""
        ...

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path) -> None: ...


@dataclasses.dataclass
class Assembly:
    """What a recipe builds after the first write: the trainer and its checkpoint parts. Parts are saved and
    restored in this order: `parts` (the model first), the trainer, the RNG states, the metrics records, then
    `later_parts` (the held-out evaluation, whose restore rewrites exp_dir/eval.json after the records')."""

    trainer: Trainer
    parts: dict[str, CheckpointPart]
    later_parts: dict[str, CheckpointPart] = dataclasses.field(default_factory=dict)


class Recipe(abc.ABC):
    """The trainer-specific part of a run; `build` and `run_training` call its hooks in the order of the
    module docstring. `cfg` is the run's configuration: any schema with exp_dir, resume, logging and
    checkpoint sections (OptuneNemoConfig, TrainRMConfig)."""

    cfg: typing.Any
    log: logging.Logger = log
    """Where the runner logs the checkpoint a run resumes from (the trainer's own logger)."""

    @abc.abstractmethod
    def prepare(self) -> int:
        """Read and check every input, set up the process groups and build what needs no run directory (the
        model). Nothing is written. Returns this process's global rank."""

    @abc.abstractmethod
    def assemble(self, *, guard: PreemptionGuard, metrics: MetricsWriter,
                 checkpoints: CheckpointManager) -> Assembly:
        """After the first write: the trainer on the run's guard, metrics and checkpoints (nothing registered
        yet: the runner registers the assembly's parts)."""

    def init_from(self) -> Path | None:
        """Another run's checkpoint to start from when this run has none of its own (restored and recorded in
        exp_dir/fork.json by `CheckpointManager.start`), or None to start fresh."""
        return None

    @abc.abstractmethod
    def begin(self, restored: Path | None) -> None:
        """After the restore (`restored` None: nothing restored, the metrics start fresh): the source model's
        weights when nothing was restored, and whatever else must precede `fit`."""

    @abc.abstractmethod
    def finish(self) -> None:
        """After a completed `fit` (collective), before exp_dir/COMPLETED: the final exports."""

    @abc.abstractmethod
    def summarize(self) -> None:
        """On rank 0, after exp_dir/COMPLETED: the end-of-run summary."""


@dataclasses.dataclass
class Run:
    """A run as `build` leaves it: the trainer ready to `fit`, checkpoint restored."""

    exp_dir: Path
    rank: int
    trainer: Trainer
    metrics: MetricsWriter


class ModelPart:
    """A trainable model as a checkpoint part: weights and optimizer, sharded, under `model/` (the model's own
    `save_checkpoint` / `load_checkpoint`: the policy, the reward model)."""

    def __init__(self, model):
        self.model = model

    def save(self, directory: Path) -> None:
        self.model.save_checkpoint(str(Path(directory) / "model"))

    def load(self, directory: Path) -> None:
        self.model.load_checkpoint(str(Path(directory) / "model"))


def build(recipe: Recipe) -> Run:
    """Every component, and resume (module docstring): the run ready to `fit`. `recipe.cfg` has passed its
    trainer's `check_inputs`."""
    from optune_nemo.runtime.checkpoint import CheckpointManager
    from optune_nemo.runtime.console import setup_logging
    from optune_nemo.runtime.metrics import MetricsWriter
    from optune_nemo.runtime.preemption import PreemptionGuard

    cfg = recipe.cfg
    guard = PreemptionGuard()   # first: a signal during start-up must not kill the job
    setup_logging(rank_from_env(), cfg.logging.level)
    rank = recipe.prepare()
    exp_dir = open_run_dir(cfg, rank=rank)
    metrics = MetricsWriter.from_config(cfg, enabled=rank == 0)
    checkpoints = CheckpointManager(exp_dir, keep_last=cfg.checkpoint.keep_last)
    assembly = recipe.assemble(guard=guard, metrics=metrics, checkpoints=checkpoints)
    from optune_nemo.runtime.checkpoint import RngStates

    # the checkpoint parts, in the order of `Assembly`
    for name, part in {**assembly.parts, "trainer": assembly.trainer, "rng": RngStates(), "metrics": metrics,
                       **assembly.later_parts}.items():
        checkpoints.register(name, part)
    restored = checkpoints.start(resume=cfg.resume, init_from=recipe.init_from(), logger=recipe.log)
    if restored is None:
        metrics.start_fresh()
    recipe.begin(restored)
    return Run(exp_dir, rank, assembly.trainer, metrics)


def open_run_dir(cfg, *, rank: int) -> Path:
    """The run's first write: exp_dir's lock (one writer per exp_dir, taken before anything is written),
    exp_dir/config.yaml, and exp_dir/logs/rank<R>.log (libraries' output, from process start)."""
    from omegaconf import OmegaConf

    from optune_nemo.runtime.console import log_to

    exp_dir = Path(cfg.exp_dir)
    hold_run_dir(exp_dir, rank=rank)
    if rank == 0:
        exp_dir.mkdir(parents=True, exist_ok=True)
        # the whole configuration, as `config.config_to_yaml` (and rm.config's) writes it
        (exp_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    log_to(exp_dir / "logs")
    return exp_dir


def run_training(recipe: Recipe) -> Outcome:
    """Everything after validation: `build`, `fit`, and the end of a completed run."""
    from optune_nemo.interfaces import Outcome

    run = build(recipe)
    outcome = run.trainer.fit()
    run.metrics.close()
    if outcome is Outcome.COMPLETED:
        recipe.finish()
        if run.rank == 0:
            (run.exp_dir / COMPLETED).write_text("ok\n")
            recipe.summarize()
    return outcome


def run_in_run_dir(recipe: Recipe) -> Outcome:
    """`run_training` inside exp_dir's `RunDir`: a configuration or checkpoint error removes what this
    invocation wrote, and exp_dir's lock is given up at the end."""
    with RunDir(recipe.cfg.exp_dir, rank=rank_from_env()):
        return run_training(recipe)


# --------------------------------------------------------------------------- the model source


def resolve(cfg):
    """`cfg` with model.* replaced by the shape of `policy.hf_path` (read from config.json or a GGUF header;
    nothing is written) and precision=auto decided for this machine, ready for `config.validate`."""
    from optune_nemo.megatron.pretrained import with_source_shape
    from optune_nemo.runtime.hardware import resolve_precision

    return resolve_precision(with_source_shape(cfg))


def prepare_source(cfg) -> Path | None:
    """The HF directory of `policy.hf_path` (a GGUF dequantised once into `policy.cache_dir`), or None."""
    if cfg.policy.hf_path is None:
        return None
    from optune_nemo.megatron.pretrained import inspect_source, materialise

    return materialise(inspect_source(cfg.policy.hf_path), cfg.policy.cache_dir)


def load_tokenizer(cfg, hf_dir: Path | None):
    """The source model's tokenizer with the configured overrides, or the byte tokenizer of the tiny model."""
    if hf_dir is None:
        from optune_nemo.data import ByteTokenizer

        return ByteTokenizer()
    from optune_nemo.data.hf_tokenizer import HFTokenizer

    return HFTokenizer.from_pretrained(hf_dir, chat_template=cfg.policy.chat_template,
                                       stop_tokens=cfg.policy.stop_tokens)
