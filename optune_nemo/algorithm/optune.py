"""The OPTune loop (SPEC.md; the paper's Algorithm 1). It talks to interfaces only: a Policy, a
GenerationEngine, a reward model and the rollout store. Every rank runs the same loop on the same
data; parallelism lives behind the interfaces.

Iteration t:
  1. choose prompts to regenerate   (t = 0: all; else K = ceil(rho*N) by the selection strategy)
  2. sample 2 fresh responses each with pi_t, score only these
  3. update the store (reused pairs unchanged), re-rank prompts by max(r_a, r_b)
  4. reference log-probs of ALL pairs of D_t under pi_t (the policy before this iteration's update)
  5. train on D_t with wDPO/DPO for epochs_per_iteration -> pi_{t+1}
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from functools import partial

import torch

from optune_nemo import losses
from optune_nemo.algorithm.selection import select_prompts
from optune_nemo.algorithm.store import RolloutStore
from optune_nemo.checkpoint import CheckpointManager, GenerationChunks
from optune_nemo.config import OptuneNemoConfig
from optune_nemo.logging import MetricsWriter, progress
from optune_nemo.preemption import PreemptionGuard
from optune_nemo.types import GenerationEngine, Policy, PreferenceBatch, Prompt, SamplingParams

log = logging.getLogger(__name__)


def sampling_key(iteration: int, prompt_id: int) -> int:
    """Seed key of a prompt's samples at an iteration: stable across runs, batches and ranks."""
    digest = hashlib.blake2b(f"{iteration}:{prompt_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def pair_loss_fn(cfg: OptuneNemoConfig):
    """The per-pair loss the policy trains with (a `types.PairLossFn`)."""
    if cfg.loss.name == "wdpo":
        return partial(losses.wdpo_per_pair, beta1=cfg.loss.beta1, beta2=cfg.loss.beta2)

    def dpo(pc, pr, rc, rr, chosen_rewards, rejected_rewards):
        per_pair, margin = losses.dpo_per_pair(pc, pr, rc, rr, beta1=cfg.loss.beta1)
        return per_pair, margin, torch.ones_like(margin)

    return dpo


@dataclass
class Phase:
    """Wall-clock seconds per phase of one iteration."""

    generation: float = 0.0
    reward: float = 0.0
    reference: float = 0.0
    train: float = 0.0
    generated_tokens: int = 0
    extra: dict = field(default_factory=dict)


class OPTune:
    """Runs iterations [next_iteration, cfg.optune.iterations) and checkpoints after each."""

    def __init__(self, cfg: OptuneNemoConfig, *, prompts: list[Prompt], policy: Policy,
                 engine: GenerationEngine, reward, store: RolloutStore,
                 checkpoints: CheckpointManager, metrics: MetricsWriter, guard: PreemptionGuard,
                 stop_token_ids: tuple[int, ...], next_iteration: int = 0):
        self.cfg = cfg
        self.prompts = {p.prompt_id: p for p in prompts}
        self.policy, self.engine, self.reward, self.store = policy, engine, reward, store
        self.checkpoints, self.metrics, self.guard = checkpoints, metrics, guard
        self.chunks = GenerationChunks(cfg.exp_dir)
        self.loss_fn = pair_loss_fn(cfg)
        self.next_iteration = next_iteration
        self.callbacks: list = []   # f(iteration) after each iteration's checkpoint (e.g. HF export)
        g = cfg.generation
        self.sampling = SamplingParams(n=2, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                                       max_new_tokens=g.max_new_tokens,
                                       stop_token_ids=tuple(stop_token_ids), seed=cfg.seed)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> str:
        """Returns `completed` or `preempted`."""
        self.chunks.reset_except(self.next_iteration)
        while self.next_iteration < self.cfg.optune.iterations:
            t = self.next_iteration
            record = self.iteration(t)
            if record is None:
                return "preempted"
            self.next_iteration = t + 1
            if self.cfg.checkpoint.save:
                self.save_checkpoint(t)
            self.chunks.reset_except(self.next_iteration)
            self.metrics.write(record)
            for callback in self.callbacks:
                callback(t)
            if self.next_iteration < self.cfg.optune.iterations and self.guard.requested():
                return "preempted"
        return "completed"

    def iteration(self, t: int) -> dict | None:
        """One iteration of Algorithm 1; None when stopped early for pre-emption."""
        start, phase = time.perf_counter(), Phase()
        regenerate = self.select(t)                                          # step 1
        log.info("iteration %d: phase=generation, regenerating %d of %d prompts",
                 t, len(regenerate), len(self.prompts))
        self.engine.begin_generation()
        new_pairs = self.sample_and_score(t, regenerate, phase)              # step 2
        self.engine.end_generation()
        if new_pairs is None:
            return None
        for pid, (a, b, r_a, r_b) in new_pairs.items():                      # step 3
            self.store.set_pair(pid, a, b, r_a, r_b, t)
        log.info("iteration %d: phase=reference", t)
        batch, n_ties = self.training_set(phase)                             # step 4
        if self.guard.requested():
            return None
        log.info("iteration %d: phase=train on %d pairs (%d ties left out)", t, len(batch), n_ties)
        tic = time.perf_counter()
        steps = self.policy.train(batch, self.loss_fn, epochs=self.cfg.train.epochs_per_iteration,
                                  seed=self.cfg.seed * 1_000_003 + t) if len(batch) else []  # step 5
        phase.train = time.perf_counter() - tic
        return self.record(t, regenerate, batch, n_ties, steps, phase, time.perf_counter() - start)

    # ------------------------------------------------------------------ steps

    def select(self, t: int) -> list[int]:
        """Step 1. Iteration 0 is fully online for every strategy (SPEC.md)."""
        if t == 0:
            return sorted(self.prompts)
        o = self.cfg.optune
        scores = self.store.ranking_scores()
        ids = sorted(scores)
        return select_prompts(o.selection, [scores[i] for i in ids], ids,
                              rho=o.rho, seed=self.cfg.seed, iteration=t)

    def sample_and_score(self, t: int, prompt_ids: list[int], phase: Phase):
        """Step 2, in persisted chunks. Returns {prompt_id: (sample_a, sample_b, r_a, r_b)}."""
        size = self.cfg.generation.chunk_size
        chunks = [prompt_ids[i:i + size] for i in range(0, len(prompt_ids), size)]
        done = self.chunks.existing(t)
        result = {}
        for index, ids in enumerate(progress(chunks, desc=f"iter {t} generate+score",
                                             enabled=self.cfg.logging.progress)):
            payload = self.chunks.load(t, index) if index in done else None
            if payload is None or payload["prompt_ids"] != ids:
                payload = self._generate_chunk(t, ids, phase)
                self.chunks.save(t, index, payload)
            phase.generated_tokens += sum(s.num_tokens for pair in payload["samples"] for s in pair)
            for pid, (a, b), (r_a, r_b) in zip(ids, payload["samples"], payload["rewards"]):
                result[pid] = (a, b, r_a, r_b)
            if index + 1 < len(chunks) and self.guard.requested():
                return None
        return result

    def _generate_chunk(self, t: int, ids: list[int], phase: Phase) -> dict:
        tic = time.perf_counter()
        samples = self.engine.generate([list(self.prompts[i].token_ids) for i in ids], self.sampling,
                                       keys=[sampling_key(t, i) for i in ids])
        phase.generation += time.perf_counter() - tic
        tic = time.perf_counter()
        flat_prompts = [self.prompts[i] for i in ids for _ in range(2)]
        flat_texts = [s.text for pair in samples for s in pair]
        rewards = self.reward.score(flat_prompts, flat_texts)   # only the new responses
        phase.reward += time.perf_counter() - tic
        return {"prompt_ids": list(ids), "samples": [(p[0], p[1]) for p in samples],
                "rewards": [(rewards[2 * k], rewards[2 * k + 1]) for k in range(len(ids))]}

    def training_set(self, phase: Phase) -> tuple[PreferenceBatch, int]:
        """Step 4: D_t = every non-tied pair of the store, reused ones included, with reference
        log-probs under the current policy pi_t (computed before any update of this iteration,
        so no second copy of the model is needed)."""
        pairs, n_ties = self.store.preference_pairs(self.cfg.optune.min_reward_gap)
        prompts = [list(p.prompt_token_ids) for p in pairs]
        chosen = [list(p.chosen_token_ids) for p in pairs]
        rejected = [list(p.rejected_token_ids) for p in pairs]
        tic = time.perf_counter()
        if pairs:
            ref = self.policy.sequence_logprobs(prompts + prompts, chosen + rejected)
        else:
            ref = torch.zeros(0)
        phase.reference = time.perf_counter() - tic
        n = len(pairs)
        batch = PreferenceBatch(
            prompts=prompts, chosen=chosen, rejected=rejected,
            ref_chosen_logps=ref[:n].float(), ref_rejected_logps=ref[n:].float(),
            chosen_rewards=torch.tensor([p.chosen_reward for p in pairs], dtype=torch.float32),
            rejected_rewards=torch.tensor([p.rejected_reward for p in pairs], dtype=torch.float32))
        return batch, n_ties

    # ------------------------------------------------------------------ bookkeeping

    def record(self, t, regenerate, batch, n_ties, steps, phase: Phase, total_s: float) -> dict:
        scores = self.store.ranking_scores()
        pairs = len(batch)

        def mean_over_steps(key):
            w = [s["num_pairs"] for s in steps]
            return sum(s[key] * n for s, n in zip(steps, w)) / sum(w) if steps else None

        rewards_rejected = [min(self.store.pair(i).reward_a, self.store.pair(i).reward_b) for i in scores]
        return {
            "iteration": t,
            "regenerated": len(regenerate),
            "generated_tokens": phase.generated_tokens,
            "time_generation_s": phase.generation,
            "time_reward_s": phase.reward,
            "time_reference_s": phase.reference,
            "time_train_s": phase.train,
            "time_total_s": total_s,
            "generation_tokens_per_s": phase.generated_tokens / phase.generation if phase.generation else None,
            "reward_chosen_mean": sum(scores.values()) / len(scores),
            "reward_rejected_mean": sum(rewards_rejected) / len(rewards_rejected),
            "train_pairs": pairs,
            "ties": n_ties,
            "optimizer_steps": len(steps),
            "loss": mean_over_steps("loss"),
            "wdpo_weight_mean": mean_over_steps("wdpo_weight_mean"),
            "implicit_reward_accuracy": mean_over_steps("implicit_reward_accuracy"),
            "margin_mean": mean_over_steps("margin_mean"),
            "grad_norm_mean": mean_over_steps("grad_norm"),
            "lr": steps[-1]["lr"] if steps else None,
        }

    def save_checkpoint(self, t: int) -> None:
        self.checkpoints.save(
            t, save_model=self.policy.save_checkpoint,
            save_rank0=lambda d: self.store.to_parquet(d / "rollouts.parquet"),
            trainer_state={"next_iteration": t + 1, "config": self.cfg})
