"""The OPTune loop: the paper's Algorithm 1 (docs/algorithm.md states it precisely, with the choices the
paper leaves open). It talks to interfaces only: a Policy, a GenerationEngine, a Reward, a PairLoss, the
rollout store and the store of generation chunks, all handed in by the builder (`train.py`). Every rank
runs the same loop on the same data; parallelism lives behind the interfaces.

Iteration t:
  1. choose prompts to regenerate   (t = 0: all; else K = ceil(rho*N) by the selection strategy)
  2. sample n = generation.num_samples fresh responses each with pi_t (one prefill), score only these
  3. update the store with each regenerated prompt's highest- and lowest-reward sample (reused pairs
     unchanged), re-rank prompts by max(r_a, r_b)
  4. reference log-probs of ALL pairs of D_t under pi_t (the policy before this iteration's update)
  5. train on D_t with the loss (wDPO by default) for epochs_per_iteration -> pi_{t+1}
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from optune_nemo.algorithm.store import RolloutStore
from optune_nemo.config import ConfigError, OptuneNemoConfig, config_from_yaml, config_to_yaml
from optune_nemo.errors import CheckpointError
from optune_nemo.interfaces import (
    GenerationEngine,
    Outcome,
    Policy,
    PreferenceBatch,
    Prompt,
    Reward,
    Sample,
    SamplingParams,
)
from optune_nemo.runtime.console import bar_shown, progress
from optune_nemo.runtime.distributed import global_rank
from optune_nemo.runtime.fileio import write_text_atomic
from optune_nemo.runtime.seeding import mix_seed
from optune_nemo.selection import select_prompts, view_of

if TYPE_CHECKING:       # the run's plumbing, handed in: the loop only calls it
    from optune_nemo.losses import PairLoss
    from optune_nemo.runtime.checkpoint import CheckpointManager, GenerationChunks
    from optune_nemo.runtime.metrics import MetricsWriter
    from optune_nemo.runtime.preemption import PreemptionGuard

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.yaml"


def sampling_key(iteration: int, prompt_id: int) -> int:
    """Seed key of a prompt's samples at an iteration: stable across runs, batches and ranks."""
    return mix_seed(iteration, prompt_id)


@dataclass
class PhaseTimes:
    """Wall-clock seconds per phase of one iteration, and the tokens generated in it."""

    generation: float = 0.0
    reward: float = 0.0
    reference: float = 0.0
    train: float = 0.0
    generated_tokens: int = 0
    reward_calls: int = 0
    """(prompt, response) pairs the reward scored for this iteration (regenerated prompts x num_samples),
    counted whether scored in this process or, before a resume, in the one that persisted the chunk."""
    sample_rewards: list[float] = field(default_factory=list)
    """The rewards of every new sample of the iteration."""


class OPTune:
    """Runs iterations [next_iteration, cfg.optune.iterations) and checkpoints after each. `loss` is the
    pair loss of step 5 (`losses.build_loss(cfg.loss)`); `chunks` keeps an iteration's generated and scored
    chunks until its checkpoint (`runtime.checkpoint.GenerationChunks`)."""

    def __init__(self, cfg: OptuneNemoConfig, *, prompts: list[Prompt], policy: Policy,
                 engine: GenerationEngine, reward: Reward, loss: PairLoss, store: RolloutStore,
                 chunks: GenerationChunks, checkpoints: CheckpointManager, metrics: MetricsWriter,
                 guard: PreemptionGuard, stop_token_ids: tuple[int, ...]):
        self.cfg = cfg
        self.prompts = {p.prompt_id: p for p in prompts}
        self.policy, self.engine, self.reward, self.loss = policy, engine, reward, loss
        self.store, self.chunks = store, chunks
        self.checkpoints, self.metrics, self.guard = checkpoints, metrics, guard
        self.next_iteration = 0
        self.after_iteration: list[Callable[[int], dict | None]] = []
        """f(t) after iteration t's training, before its checkpoint; a returned dict joins the record
        (held-out evaluation); also used for per-iteration exports."""
        g = cfg.generation
        if g.num_samples < 2:
            raise ConfigError(f"generation.num_samples: must be >= 2, a pair needs two samples (got {g.num_samples})")
        self.num_samples = g.num_samples
        self.sampling = SamplingParams(n=g.num_samples, temperature=g.temperature, top_p=g.top_p,
                                       top_k=g.top_k, max_new_tokens=g.max_new_tokens,
                                       stop_token_ids=tuple(stop_token_ids), seed=cfg.seed)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> Outcome:
        """Iterations until cfg.optune.iterations (COMPLETED), or until a pre-emption request (PREEMPTED)."""
        self.chunks.reset_except(self.next_iteration)
        while self.next_iteration < self.cfg.optune.iterations:
            t = self.next_iteration
            record = self.iteration(t)
            if record is Outcome.PREEMPTED:
                return Outcome.PREEMPTED
            log.info("iteration %d: done in %.1f s (generation %.1f s, reference %.1f s, train %.1f s), "
                     "chosen reward %.3f%s", t, record["time_total_s"], record["time_generation_s"],
                     record["time_reference_s"], record["time_train_s"], record["reward_chosen_mean"],
                     f", loss {record['loss']:.4f}" if record.get("loss") is not None else "")
            for hook in self.after_iteration:
                record.update(hook(t) or {})
            self.metrics.add(record)
            self.next_iteration = t + 1
            if self.cfg.checkpoint.save:
                self.checkpoints.save(t)          # the record is part of the checkpoint
            self.metrics.flush()
            self.chunks.reset_except(self.next_iteration)
            if self.next_iteration < self.cfg.optune.iterations and self.guard.requested():
                return Outcome.PREEMPTED
        return Outcome.COMPLETED

    def iteration(self, t: int) -> dict | Outcome:
        """One iteration of Algorithm 1: its metrics record, or Outcome.PREEMPTED when stopped early (between
        generation chunks, or before training)."""
        start, times = time.perf_counter(), PhaseTimes()
        regenerate = self.select(t)                                          # step 1
        log.info("iteration %d: phase=generation, regenerating %d of %d prompts",
                 t, len(regenerate), len(self.prompts))
        new_pairs = self.sample_and_score(t, regenerate, times)              # step 2
        if new_pairs is Outcome.PREEMPTED:
            return Outcome.PREEMPTED
        for pid, (samples, rewards) in new_pairs.items():                     # step 3
            self.store.set_samples(pid, samples, rewards, t)
        log.info("iteration %d: phase=reference", t)
        batch, n_ties = self.training_set(t, times)                          # step 4
        if self.guard.requested():
            return Outcome.PREEMPTED
        log.info("iteration %d: phase=train on %d pairs (%d ties left out)", t, len(batch), n_ties)
        tic = time.perf_counter()
        epochs = self.cfg.train.epochs_per_iteration
        steps = self.policy.train(batch, self.loss, epochs=epochs,
                                  seed=self.train_seed(t)) if len(batch) and epochs else []         # step 5
        times.train = time.perf_counter() - tic
        return self.record(t, regenerate, batch, n_ties, steps, times, time.perf_counter() - start)

    # ------------------------------------------------------------------ steps

    def select(self, t: int) -> list[int]:
        """Step 1. Iteration 0 is fully online for every strategy (docs/algorithm.md)."""
        if t == 0:
            return sorted(self.prompts)
        o = self.cfg.optune
        return select_prompts(o.selection, view_of(self.store), rho=o.rho, seed=self.cfg.seed, iteration=t)

    def sample_and_score(self, t: int, prompt_ids: list[int], times: PhaseTimes) -> dict | Outcome:
        """Step 2, in persisted chunks. Returns {prompt_id: (n samples, their n rewards)}, or Outcome.PREEMPTED
        when a stop was requested between chunks."""
        size = self.cfg.generation.chunk_size
        chunks = [prompt_ids[i:i + size] for i in range(0, len(prompt_ids), size)]
        done = self.chunks.existing(t)
        result = {}
        # progress as lines where no bar shows it (a log file, a batch job), and only for several chunks
        chunk_level = logging.INFO if len(chunks) > 1 and not bar_shown(self.cfg.logging.progress) else logging.DEBUG
        self.engine.begin_generation()
        self.reward.prepare()
        try:
            for index, ids in enumerate(progress(chunks, desc=f"iter {t} generate+score",
                                                 enabled=self.cfg.logging.progress)):
                payload = self.chunks.load(t, index) if index in done else None
                if payload is None or payload["prompt_ids"] != ids or not self._has_all_samples(payload):
                    payload = self._generate_chunk(t, ids, times)
                    self.chunks.save(t, index, payload)     # kept even if scoring fails: never generated twice
                    log.log(chunk_level, "iteration %d: chunk %d of %d generated (%d prompts)", t, index,
                            len(chunks), len(ids))
                if payload.get("rewards") is None:
                    payload["rewards"] = self._score_chunk(ids, payload, times)
                    self.chunks.save(t, index, payload)
                per_prompt = _samples_of(payload)
                times.generated_tokens += sum(s.num_tokens for samples in per_prompt for s in samples)
                for pid, samples, rewards in zip(ids, per_prompt, payload["rewards"]):
                    result[pid] = (samples, rewards)
                    times.reward_calls += len(rewards)
                    times.sample_rewards += rewards
                if index + 1 < len(chunks) and self.guard.requested():
                    return Outcome.PREEMPTED
        finally:
            self.reward.release()
            self.engine.end_generation()
        return result

    def _generate_chunk(self, t: int, ids: list[int], times: PhaseTimes) -> dict:
        tic = time.perf_counter()
        samples = self.engine.generate([list(self.prompts[i].token_ids) for i in ids], self.sampling,
                                       keys=[sampling_key(t, i) for i in ids])
        times.generation += time.perf_counter() - tic
        return {"prompt_ids": list(ids), "rewards": None,
                "samples": [[{"token_ids": s.token_ids, "text": s.text, "finish_reason": s.finish_reason}
                             for s in per_prompt] for per_prompt in samples]}

    def _has_all_samples(self, payload: dict) -> bool:
        """A persisted chunk holds num_samples samples per prompt (and as many rewards once scored)."""
        n = self.num_samples
        return (all(len(s) == n for s in payload["samples"])
                and (payload.get("rewards") is None or all(len(r) == n for r in payload["rewards"])))

    def _score_chunk(self, ids: list[int], payload: dict, times: PhaseTimes) -> list[list[float]]:
        """Rewards of a chunk's new responses (only these: reused pairs are never re-scored)."""
        tic = time.perf_counter()
        n = self.num_samples
        flat_prompts = [self.prompts[i] for i in ids for _ in range(n)]
        flat_texts = [s["text"] for samples in payload["samples"] for s in samples]
        rewards = self.reward.score(flat_prompts, flat_texts)
        times.reward += time.perf_counter() - tic
        return [rewards[n * k:n * (k + 1)] for k in range(len(ids))]

    def train_seed(self, t: int) -> int:
        """Seeds iteration t's pair order; the reference pass uses the same batching (Policy.pair_logprobs)."""
        return mix_seed(self.cfg.seed, "train", t)

    def training_set(self, t: int, times: PhaseTimes) -> tuple[PreferenceBatch, int]:
        """Step 4: D_t = every non-tied pair of the store, reused ones included, with reference
        log-probs under the current policy pi_t (computed before any update of this iteration,
        so no second copy of the model is needed)."""
        pairs, n_ties = self.store.preference_pairs(self.cfg.optune.min_reward_gap)
        prompts = [list(p.prompt_token_ids) for p in pairs]
        chosen = [list(p.chosen_token_ids) for p in pairs]
        rejected = [list(p.rejected_token_ids) for p in pairs]
        tic = time.perf_counter()
        ref_c, ref_r = (self.policy.pair_logprobs(prompts, chosen, rejected, seed=self.train_seed(t)) if pairs
                        else (torch.zeros(0), torch.zeros(0)))
        times.reference = time.perf_counter() - tic
        batch = PreferenceBatch(
            prompts=prompts, chosen=chosen, rejected=rejected, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r,
            chosen_rewards=torch.tensor([p.chosen_reward for p in pairs], dtype=torch.float32),
            rejected_rewards=torch.tensor([p.rejected_reward for p in pairs], dtype=torch.float32))
        return batch, n_ties

    # ------------------------------------------------------------------ bookkeeping

    def record(self, t, regenerate, batch, n_ties, steps, times: PhaseTimes, total_s: float) -> dict:
        scores = self.store.ranking_scores()
        rewards_rejected = [min(self.store.pair(i).reward_a, self.store.pair(i).reward_b) for i in scores]
        record = {
            "iteration": t,
            "regenerated": len(regenerate),
            "num_samples": self.num_samples,
            "reward_calls": times.reward_calls,
            "generated_tokens": times.generated_tokens,
            "time_generation_s": times.generation,
            "time_reward_s": times.reward,
            "time_reference_s": times.reference,
            "time_train_s": times.train,
            "time_total_s": total_s,
            "generation_tokens_per_s": times.generated_tokens / times.generation if times.generation else None,
            "reward_chosen_mean": sum(scores.values()) / len(scores),
            "reward_rejected_mean": sum(rewards_rejected) / len(rewards_rejected),
            # mean reward of all new samples: the chosen mean's lift over it is what best-of-n buys
            "reward_samples_mean": (sum(times.sample_rewards) / len(times.sample_rewards)
                                    if times.sample_rewards else None),
            "train_pairs": len(batch),
            "ties": n_ties,
            "optimizer_steps": len(steps),
            "grad_norm_mean": _mean_over_steps(steps, "grad_norm"),
            "lr": steps[-1]["lr"] if steps else None,
        }
        skip = {"num_pairs", "lr", "grad_norm", "skipped"}
        for key in (steps[0] if steps else {}):
            if key not in skip:          # the loss and every metric the loss reports
                record[key] = _mean_over_steps(steps, key)
        return record

    # ------------------------------------------------------------------ checkpoint part

    def save(self, directory: Path) -> None:
        """The loop's own state: the next iteration and the configuration that produced the checkpoint."""
        if global_rank() == 0:
            text = f"next_iteration: {self.next_iteration}\nconfig:\n"
            text += "".join(f"  {line}\n" for line in config_to_yaml(self.cfg).splitlines())
            write_text_atomic(directory / TRAINER_STATE, text)

    def load(self, directory: Path) -> None:
        self.next_iteration = read_trainer_state(directory)[0]


def read_trainer_state(directory: Path) -> tuple[int, OptuneNemoConfig]:
    """(next iteration, configuration) of a checkpoint directory, from its YAML (nothing unpickled)."""
    from omegaconf import OmegaConf

    path = Path(directory) / TRAINER_STATE
    try:
        data = OmegaConf.to_container(OmegaConf.load(path))
        return int(data["next_iteration"]), config_from_yaml(OmegaConf.to_yaml(data["config"]))
    except Exception as e:   # missing file, bad YAML, a config this schema rejects
        raise CheckpointError(f"{path}: not a readable trainer state ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _samples_of(payload: dict) -> list[list[Sample]]:
    return [[Sample(list(s["token_ids"]), s["text"], s["finish_reason"]) for s in samples]
            for samples in payload["samples"]]


def _mean_over_steps(steps: list[dict], key: str) -> float | None:
    """Mean over optimizer steps weighted by each step's number of pairs."""
    w = [s["num_pairs"] for s in steps]
    return sum(s[key] * n for s, n in zip(steps, w)) / sum(w) if steps and sum(w) else None
