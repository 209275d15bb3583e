"""`reward.type=hf`: a Hugging Face sequence-classification reward model (`reward.path`, num_labels 1) run
with transformers on every rank.

What is scored: the reward model's own tokenizer and chat template render (conversation, response) exactly
as reward-model training does (`data.preferences.render_sequence`: the prompt's whole conversation, every
earlier turn and a system message included, with the generation prompt, then the response, then the
tokenizer's first stop token). A batch is right-padded with config.json's
`pad_token_id` under an attention mask, and transformers reads each score at the rightmost token that is
not the pad id (with no pad id in the config, one sequence per forward, scored at its last token).
Responses are sorted by rendered length before batching (`reward.batch_size` per forward), so a batch
pads little.

The model is not model-parallel, so the work is dealt over every rank of the world (not only over
data-parallel ranks, whose tensor / pipeline peers would compute the same scores). bf16 on a GPU, fp32
on the CPU. `prepare()` moves the weights to the rank's GPU; `release()` moves them back to host memory
and empties the CUDA cache (both no-ops on the CPU, where the weights stay where they are).
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from optune_nemo.config import ConfigError, RewardConfig
from optune_nemo.interfaces import Prompt
from optune_nemo.reward.base import REWARD_TYPES, ShardedReward
from optune_nemo.runtime.distributed import DistEnv, local_device

log = logging.getLogger(__name__)


def conversation(prompt: Prompt) -> list[dict]:
    """The conversation a response answers: the prompt's whole `messages` (system message and earlier turns
    included), or its text as one user turn when it has none (`Prompt.conversation`)."""
    return prompt.conversation()


def load_rm_tokenizer(directory: Path, *, key: str):
    """The project tokenizer (`HFTokenizer`) of a reward-model directory, with a chat template."""
    from optune_nemo.data.hf_tokenizer import HFTokenizer

    try:
        tokenizer = HFTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: cannot load the tokenizer of {directory} ({str(e).splitlines()[0]})") from None
    if not tokenizer.chat_template:
        raise ConfigError(f"{key}: the tokenizer of {directory} has no chat template (the reward model scores "
                          "chat-rendered conversations)")
    return tokenizer


class RenderedReward(ShardedReward):
    """A reward model scoring token sequences: renders (prompt, response) with its tokenizer and scores the
    shard in order of rendered length (`score_sequences` implements one batch)."""

    key = "reward.path"

    def __init__(self, *, tokenizer, name: str, batch_size: int, dist: DistEnv | None):
        super().__init__(name=name, batch_size=batch_size, dist=dist)
        self.tokenizer = tokenizer

    def render(self, prompt: Prompt, response: str) -> list[int]:
        from optune_nemo.data.preferences import render_sequence

        return render_sequence(self.tokenizer, conversation(prompt), response)

    @abstractmethod
    def score_sequences(self, seqs: list[list[int]]) -> list[float]:
        """Scores of one batch of whole sequences."""

    def score_batch(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> Sequence[float]:
        return self.score_sequences([self.render(p, r) for p, r in zip(prompts, responses)])

    def _score_local(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        # sorting the whole shard first makes every batch of the base class hold sequences of similar length
        lengths = [len(self.render(p, r)) for p, r in zip(prompts, responses)]
        order = sorted(range(len(prompts)), key=lambda i: lengths[i])
        got = super()._score_local([prompts[i] for i in order], [responses[i] for i in order])
        out = [0.0] * len(prompts)
        for i, v in zip(order, got):
            out[i] = v
        return out


class HFReward(RenderedReward):
    """`reward.type=hf` (module docstring)."""

    def __init__(self, model, *, tokenizer, name: str, batch_size: int, dist: DistEnv | None,
                 device: torch.device):
        super().__init__(tokenizer=tokenizer, name=name, batch_size=batch_size, dist=dist)
        self.model, self.device = model, device
        self.pad_token_id = model.config.pad_token_id

    def prepare(self) -> None:
        self.model.to(self.device)

    def release(self) -> None:
        if self.device.type == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()

    def score_sequences(self, seqs: list[list[int]]) -> list[float]:
        if self.pad_token_id is None:    # transformers scores unpadded sequences only
            return [v for s in seqs for v in self._forward([s], pad_id=0)]
        return self._forward(seqs, pad_id=self.pad_token_id)

    def _forward(self, seqs: list[list[int]], *, pad_id: int) -> list[float]:
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, :len(s)] = 1
        with torch.no_grad():
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        return logits[:, 0].float().cpu().tolist()


@REWARD_TYPES.register("hf")
def build(cfg: RewardConfig, *, dist: DistEnv | None = None) -> HFReward:
    """`reward.type=hf`: loads the model on the host (checked: a *ForSequenceClassification with num_labels 1)."""
    from transformers import AutoModelForSequenceClassification

    from optune_nemo.megatron.hf_rm import read_rm_config

    path = Path(cfg.path).expanduser()
    read_rm_config(path, key="reward.path", any_architecture=True)
    tokenizer = load_rm_tokenizer(path, key="reward.path")
    device = dist.device if dist is not None else local_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype).eval()
    except (OSError, ValueError) as e:
        raise ConfigError(f"reward.path: transformers cannot load {path} ({str(e).splitlines()[0]})") from None
    # every rank scores its own share: the tensor / pipeline peers of a data-parallel rank are not idle copies
    world = replace(dist, dp_rank=dist.rank, dp_size=dist.world_size) if dist is not None else None
    reward = HFReward(model, tokenizer=tokenizer, name=str(path), batch_size=cfg.batch_size, dist=world,
                      device=device)
    log.info("reward model %s (transformers, %s) on %s", path, str(dtype).removeprefix("torch."), device)
    return reward
