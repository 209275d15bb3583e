"""`reward.type=remote`: a reward model served by `python -m optune_nemo.serve_rm` (Triton Inference Server
through PyTriton), scored over HTTP or gRPC with PyTriton's `ModelClient` (the KServe v2 protocol).

The wire format (one model, batched along the first dimension, `docs/serving.md`):
    prompts    BYTES [B, 1]    each a UTF-8 JSON object: {"text", "metadata", "prompt_id", "token_ids",
                               "messages", ...} (every field of `interfaces.Prompt`; only "text" is
                               required; "messages", the whole conversation as a list of {"role",
                               "content"}, is what a served reward model renders, "text" alone counting
                               as one user turn, so clients and servers of either age understand each
                               other)
    responses  BYTES [B, 1]    each a response as UTF-8 text
    rewards    FP32  [B, 1]    one reward per (prompt, response)
Rewards travel as float32: a remote reward equals the served reward rounded to float32.

Every rank of the training run is a client of its own: the pairs are dealt over all ranks (not only the
data-parallel ones; a server needs no model-parallel group on the client side). A batch that fails for
want of a server (no connection, a timeout, a server that is stopping) is tried again after 1, 2, 4, ...
seconds, `reward.max_retries` times, then the run stops with `RewardUnavailable` (exit 1, nothing
generated is lost). A batch that the served reward itself fails on is not retried: `RewardError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import re
import time
import typing
import warnings
from collections.abc import Callable, Sequence

from optune_nemo.config import ConfigError, RewardConfig
from optune_nemo.interfaces import Prompt
from optune_nemo.reward.base import REWARD_TYPES, RewardError, RewardUnavailable, ShardedReward
from optune_nemo.runtime.distributed import DistEnv, all_gather_object

log = logging.getLogger(__name__)

HAVE_PYTRITON = importlib.util.find_spec("pytriton") is not None

INPUTS = ("prompts", "responses")
OUTPUT = "rewards"

SERVER_ERROR_MARK = "optune-reward-error:"
"""Starts the message of an error raised by the served reward, then `<kind>: <message>`, so a client tells
a failing reward (kind `config`, `error` or `request`: not retried) from a failing server or a service
the served reward depends on (kind `unavailable`: retried like a connection error)."""

_BACKOFF_S = 1.0
"""Pause before the first retry; it doubles with each further retry (exponential back-off)."""
_BACKOFF_MAX_S = 30.0
"""Longest pause between two attempts."""


def _pause(seconds: float) -> None:
    """The back-off pause (a seam for tests, which record it instead of waiting)."""
    time.sleep(seconds)


_INSTALL = "pip install 'optune-nemo[serve]' (nvidia-pytriton)"


# --------------------------------------------------------------------------- wire format

def prompt_to_wire(p: Prompt) -> bytes:
    """A prompt as UTF-8 JSON: every field of `Prompt` (tuples as lists). ASCII-escaped, so any text
    (lone surrogates included) round-trips."""
    return json.dumps({f.name: getattr(p, f.name) for f in dataclasses.fields(Prompt)}).encode()


def prompt_from_wire(data: bytes) -> Prompt:
    """Inverse of `prompt_to_wire`. Non-Python clients may send only {"text": ...} (then prompt id -1, no
    tokens, no metadata, no messages: the text is the conversation's one user turn). Raises ValueError on
    anything else."""
    d = json.loads(data)
    if not isinstance(d, dict) or not isinstance(d.get("text"), str):
        raise ValueError(f"a prompt must be a JSON object with a string `text` (got {data[:80]!r})")
    messages = d.get("messages", [])
    if not (isinstance(messages, list) and all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str) for m in messages)):
        raise ValueError("a prompt's `messages` must be a list of {role: system|user|assistant, content: "
                         f"string}} (got {str(messages)[:80]})")
    hints = typing.get_type_hints(Prompt)
    kwargs = {"prompt_id": -1, "token_ids": (), "metadata": {}}
    for f in dataclasses.fields(Prompt):
        if f.name in d:
            value = d[f.name]
            kwargs[f.name] = tuple(value) if typing.get_origin(hints[f.name]) is tuple else value
    return Prompt(**kwargs)


def response_to_wire(text: str) -> bytes:
    # surrogatepass: tokenizers may decode a cut multi-byte character into a lone surrogate
    return text.encode("utf-8", "surrogatepass")


def response_from_wire(data: bytes) -> str:
    return bytes(data).decode("utf-8", "surrogatepass")


def request_arrays(prompts: Sequence[Prompt], responses: Sequence[str]) -> dict:
    """The request's input tensors: object arrays of bytes, [B, 1]."""
    import numpy as np

    def column(values):
        out = np.empty((len(values), 1), dtype=object)
        out[:, 0] = values
        return out

    return {"prompts": column([prompt_to_wire(p) for p in prompts]),
            "responses": column([response_to_wire(r) for r in responses])}


_SERVER_ERROR = re.compile(re.escape(SERVER_ERROR_MARK) + r"\s*(\w+): (.*)")


def served_reward_failure(message: str) -> tuple[str, str] | None:
    """(kind, message) of an error the served reward raised, from a server error's text; None when the
    error is the server's (unreachable, stopping, overloaded)."""
    found = _SERVER_ERROR.findall(message)
    return found[-1] if found else None


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip() or type(e).__name__
    line = text.splitlines()[0]
    return line if len(line) <= limit else line[:limit] + " ..."


def _check_url(cfg: RewardConfig) -> None:
    if not HAVE_PYTRITON:
        raise ConfigError(f"reward.type: remote needs PyTriton's client; {_INSTALL}")
    if not (cfg.url and cfg.url.startswith(("http://", "grpc://"))):
        raise ConfigError(f"reward.url: the server's http://host:port or grpc://host:port (got {cfg.url!r})")


@contextlib.contextmanager
def _quiet():
    """PyTriton warns whenever a readiness wait is given less time than the client's network timeout
    (`NotSupportedTimeoutWarning`): always the case for a wait that ends at a deadline, and harmless."""
    from pytriton.client.warnings import NotSupportedTimeoutWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotSupportedTimeoutWarning)
        yield


def _client_errors() -> tuple[type[BaseException], ...]:
    """What the client raises when a request does not get through or is refused. HTTPException: the HTTP
    client (geventhttpclient) reports a connection closed in the middle of an answer as one."""
    from http.client import HTTPException

    from pytriton.client.exceptions import PyTritonClientError
    from tritonclient.utils import InferenceServerException

    return PyTritonClientError, InferenceServerException, OSError, HTTPException


def _misuse(e: BaseException) -> bool:
    """A value the client refuses (a bad URL): no server can cure it."""
    from pytriton.client.exceptions import PyTritonClientValueError

    return isinstance(e, PyTritonClientValueError)


# --------------------------------------------------------------------------- the client

class RemoteReward(ShardedReward):
    """Scores through a served reward (module docstring): batching, timeouts, bounded retries."""

    key = "reward.url"

    def __init__(self, *, url: str, model_name: str, batch_size: int, timeout_s: float, max_retries: int,
                 dist: DistEnv | None = None):
        # every rank is a client: shard over the whole world (module docstring)
        if dist is not None:
            dist = dataclasses.replace(dist, dp_rank=dist.rank, dp_size=dist.world_size)
        super().__init__(name=f"the reward server at {url} (model {model_name!r})", batch_size=batch_size, dist=dist)
        self.url, self.model_name = url, model_name
        self.timeout_s, self.max_retries = timeout_s, max_retries
        self.request_size = batch_size
        """Pairs per request: reward.batch_size, or the server's max_batch_size when smaller."""
        self.requests = 0
        """Requests answered on this rank (retries not counted)."""
        self._client = None

    # ------------------------------------------------------------------ connection

    def _connect(self):
        from pytriton.client import ModelClient

        with _quiet():
            client = ModelClient(self.url, self.model_name, lazy_init=True, init_timeout_s=self.timeout_s,
                                 inference_timeout_s=self.timeout_s)
        try:
            with _quiet():
                client.wait_for_model(self.timeout_s)
                config = client.model_config
        except BaseException:
            client.close()
            raise
        # a run that started against a good server: what answers now is another (a rerun resumes)
        _check_model_config(config, self.url, self.model_name, error=RewardUnavailable)
        self.request_size = min(self.batch_size, config.max_batch_size)
        self._client = client
        return client

    def _drop_client(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            try:
                client.close()
            except Exception as e:      # a dead connection may fail to close: it is gone either way
                log.debug("closing the client of %s: %s", self.url, e)

    def _with_retries(self, what: str, fn: Callable):
        errors = _client_errors()
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                pause = min(_BACKOFF_S * 2 ** (attempt - 1), _BACKOFF_MAX_S)
                log.warning("%s: %s failed (%s); attempt %d of %d in %.0f s", self.url, what, last,
                            attempt + 1, self.max_retries + 1, pause)
                _pause(pause)
            try:
                return fn()
            except errors as e:
                if _misuse(e):       # check_reachable refused bad URLs at start-up: this is a bug
                    raise RewardError(f"reward.url: {_first_line(e)}") from None
                failure = served_reward_failure(str(e))
                if failure is not None and failure[0] != "unavailable":
                    kind, message = failure
                    raise RewardError(f"reward.url: the reward served at {self.url} (model {self.model_name!r}) "
                                      f"failed ({kind}): {message}") from None
                last = f"the served reward is unavailable: {failure[1]}" if failure else _first_line(e)
                self._drop_client()
        raise RewardUnavailable(
            f"reward.url: the reward server at {self.url} (model {self.model_name!r}) did not {what} in "
            f"{self.max_retries + 1} attempts (reward.timeout_s = {self.timeout_s:g} s each, "
            f"reward.max_retries = {self.max_retries}): {last}")

    def prepare(self) -> None:
        """Connect and wait until the served model is ready (retried like a batch); every rank stops with
        the same error when one cannot."""
        kinds = {"unavailable": RewardUnavailable, "error": RewardError}
        try:
            self._with_retries("become ready", lambda: self._client or self._connect())
            outcome = None
        except RewardError as e:
            outcome = ("unavailable" if isinstance(e, RewardUnavailable) else "error", str(e))
        d = self.dist
        outcomes = [outcome] if d is None or d.world_size == 1 else all_gather_object(outcome)
        for failed in outcomes:
            if failed is not None:
                raise kinds[failed[0]](failed[1])

    def release(self) -> None:
        self._drop_client()

    # ------------------------------------------------------------------ scoring

    def _infer(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        """Rewards of the first `request_size` pairs (known once connected), in one request."""
        client = self._client or self._connect()
        n = self.request_size
        with _quiet():
            out = client.infer_batch(**request_arrays(prompts[:n], responses[:n]))[OUTPUT].reshape(-1)
        self.requests += 1
        return [float(x) for x in out]

    def score_batch(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        out: list[float] = []
        while len(out) < len(prompts):
            k = len(out)
            out += self._with_retries("score a batch", lambda: self._infer(prompts[k:], responses[k:]))  # noqa: B023
        return out


def _check_model_config(config, url: str, model_name: str, *, error: type[Exception]) -> None:
    inputs = [t.name for t in config.inputs]
    outputs = [t.name for t in config.outputs]
    if sorted(inputs) != sorted(INPUTS) or outputs != [OUTPUT] or config.max_batch_size < 1:
        raise error(f"reward.url: model {model_name!r} at {url} is no optune_nemo reward server (inputs "
                          f"{inputs}, outputs {outputs}, max_batch_size {config.max_batch_size}; expected inputs "
                          f"{list(INPUTS)}, outputs [{OUTPUT!r}], batching)")


def check_reachable(cfg: RewardConfig) -> None:
    """Before a run writes anything: a ready reward server answers at `reward.url` with model
    `reward.model_name` and the wire format above, waiting at most `reward.timeout_s` for it. Raises
    ConfigError naming the key otherwise."""
    _check_url(cfg)
    from pytriton.client import ModelClient

    deadline = time.monotonic() + cfg.timeout_s
    with _quiet():
        client = ModelClient(cfg.url, cfg.model_name, lazy_init=True, init_timeout_s=cfg.timeout_s,
                             inference_timeout_s=cfg.timeout_s)
    try:
        try:
            with _quiet():
                client.wait_for_server(cfg.timeout_s)
        except _client_errors() as e:
            raise ConfigError(f"reward.url: no reward server answers at {cfg.url} within reward.timeout_s = "
                              f"{cfg.timeout_s:g} s (start one with `python -m optune_nemo.serve_rm`; "
                              f"{_first_line(e)})") from None
        try:
            with _quiet():
                client.wait_for_model(max(deadline - time.monotonic(), 1.0))
                config = client.model_config
        except _client_errors() as e:
            raise ConfigError(f"reward.model_name: the server at {cfg.url} has no ready model {cfg.model_name!r} "
                              f"({_first_line(e)})") from None
        _check_model_config(config, cfg.url, cfg.model_name, error=ConfigError)
    finally:
        client.close()


@REWARD_TYPES.register("remote")
def build(cfg: RewardConfig, *, dist: DistEnv | None = None) -> RemoteReward:
    """`reward.type=remote`. Connects lazily (at `prepare` or the first batch)."""
    _check_url(cfg)
    return RemoteReward(url=cfg.url, model_name=cfg.model_name, batch_size=cfg.batch_size, timeout_s=cfg.timeout_s,
                        max_retries=cfg.max_retries, dist=dist)
