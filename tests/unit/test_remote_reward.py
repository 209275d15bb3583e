"""`reward.type=remote` against a real `serve_rm` (PyTriton) on localhost, and the server's helpers:
wire format, libpython detection, port checks, its config schema."""

import signal
import socket
import sysconfig
import time

import numpy as np
import pytest
from serve_utils import HAVE_PYTRITON, NO_PYTRITON, RMServer, free_ports, wait_until_listening_stops

from optune_nemo.config import ConfigError, RewardConfig
from optune_nemo.interfaces import Prompt
from optune_nemo.reward.base import RewardError, RewardUnavailable, RuleReward
from optune_nemo.reward.remote import (
    prompt_from_wire,
    prompt_to_wire,
    response_from_wire,
    response_to_wire,
    served_reward_failure,
)
from optune_nemo.rm.serve_config import ServeRMConfig, render_yaml, validate_serve

needs_pytriton = pytest.mark.skipif(not HAVE_PYTRITON, reason=NO_PYTRITON)

TEXTS = ["héllo wörld ✓", "", "x" * 40, "trailing NUL\x00", "lone \ud800 surrogate", "two\nlines", "🎉", "42",
         "  spaces  ", "tab\tbed", "last"]


def _prompts(n):
    return [Prompt(i, f"What is {i} + {i}? ✓", (1, 2, 3 + i), {"answer": 2 * i, "tags": ["a", i]}) for i in range(n)]


# --------------------------------------------------------------------------- no server needed

def test_prompt_and_response_round_trip_through_the_wire():
    for p in _prompts(3) + [Prompt(7, "lone \udc80 \x00", (), {})]:
        q = prompt_from_wire(prompt_to_wire(p))
        assert (q.prompt_id, q.text, q.token_ids, q.metadata) == (p.prompt_id, p.text, p.token_ids, p.metadata)
        assert isinstance(q.token_ids, tuple)
    for t in TEXTS:
        assert response_from_wire(response_to_wire(t)) == t


def test_prompt_from_a_non_python_client_and_bad_prompts():
    q = prompt_from_wire(b'{"text": "hi \xc3\xa9"}')          # UTF-8 as any JSON client sends it
    assert (q.prompt_id, q.text, q.token_ids, q.metadata) == (-1, "hi é", (), {})
    for bad in (b"not json", b'"just a string"', b'{"metadata": {}}', b'{"text": 3}'):
        with pytest.raises(ValueError):
            prompt_from_wire(bad)


def test_served_reward_failure_is_told_from_server_failures():
    trace = ("Error occurred during inference request. Message: Traceback (most recent call last):\n  File x\n"
             "RuntimeError: optune-reward-error: config: reward.function: f returned NaN\n\nAt:\n  model.py(501)")
    assert served_reward_failure(trace) == ("config", "reward.function: f returned NaN")
    assert served_reward_failure("[503] Server is stopping") is None
    assert served_reward_failure("Timeout occurred during inference request. [Errno 111] Connection refused") is None


def test_libpython_dir(tmp_path, monkeypatch):
    from optune_nemo.rm.serve import libpython_dir

    real = sysconfig.get_config_var

    def fake(values):
        monkeypatch.setattr(sysconfig, "get_config_var", lambda k: values.get(k, real(k)))

    (tmp_path / "libpython3.11.so.1.0").write_bytes(b"")
    fake({"LIBDIR": str(tmp_path), "INSTSONAME": "libpython3.11.so.1.0"})
    assert libpython_dir({}) == str(tmp_path)                                     # pyenv-like: needed
    assert libpython_dir({"LD_LIBRARY_PATH": f"/x:{tmp_path}"}) is None           # already there
    fake({"LIBDIR": str(tmp_path), "INSTSONAME": "libpython3.11.a"})
    assert libpython_dir({}) is None                                              # static interpreter
    fake({"LIBDIR": "/usr/lib/x86_64-linux-gnu", "INSTSONAME": "libpython3.11.so.1.0", "MULTIARCH": "x86_64-linux-gnu"})
    assert libpython_dir({}) is None                                              # the system's own


def test_validate_serve():
    def cfg(**kw):
        c = ServeRMConfig()
        for key, value in kw.items():
            section, _, name = key.partition("__")
            setattr(getattr(c, section), name, value)
        return c

    validate_serve(cfg(), world_size=1)
    bad = [({"reward__type": "remote"}, "reward.type"), ({"reward__type": "hf"}, "reward.path"),
           ({"reward__batch_size": 0}, "reward.batch_size"), ({"server__http_port": 70000}, "server.http_port"),
           ({"server__grpc_port": 8000}, "server:"), ({"server__model_name": "a/b"}, "server.model_name"),
           ({"server__max_batch_size": 0}, "server.max_batch_size"), ({"server__host": ""}, "server.host"),
           ({"parallel__tensor_model_parallel_size": 2}, "parallel:")]
    for kw, key in bad:
        with pytest.raises(ConfigError) as e:
            validate_serve(cfg(**kw), world_size=1)
        assert str(e.value).startswith(key), (kw, str(e.value))
    validate_serve(cfg(parallel__tensor_model_parallel_size=2), world_size=4)


def test_serve_rm_yaml_is_generated_from_the_schema():
    from optune_nemo.config import CONF_DIR

    assert (CONF_DIR / "serve_rm.yaml").read_text() == render_yaml(), (
        "conf/serve_rm.yaml is stale: run `python -m optune_nemo.rm.serve_config > conf/serve_rm.yaml`")


def test_check_ports_free():
    from optune_nemo.rm.serve import check_ports_free
    from optune_nemo.rm.serve_config import ServerConfig

    a, b, c = free_ports(3)
    check_ports_free(ServerConfig(http_port=a, grpc_port=b, metrics_port=c))
    with socket.socket() as s:
        s.bind(("127.0.0.1", b))
        s.listen()
        with pytest.raises(ConfigError, match=rf"^server\.grpc_port: cannot listen on 127\.0\.0\.1:{b} "):
            check_ports_free(ServerConfig(http_port=a, grpc_port=b, metrics_port=c))


def _remote(url, **kw):
    from optune_nemo.reward.remote import build

    return build(RewardConfig(type="remote", url=url, **kw))


@needs_pytriton
def test_unreachable_server(monkeypatch):
    """Nothing listens: prepare() tries max_retries + 1 times with back-off 1, 2 s, then one line naming
    reward.url; check_reachable (before a run writes anything) says so as a ConfigError."""
    from optune_nemo.reward import remote

    url = f"http://127.0.0.1:{free_ports(1)[0]}"
    pauses = []
    monkeypatch.setattr(remote, "_pause", pauses.append)
    r = _remote(url, timeout_s=0.5, max_retries=2)
    tic = time.monotonic()
    with pytest.raises(RewardUnavailable) as e:
        r.prepare()
    assert pauses == [1.0, 2.0]
    assert time.monotonic() - tic < 3 * 0.5 + 5          # three waits of timeout_s (sleeps mocked)
    msg = str(e.value)
    assert msg.startswith("reward.url: ") and url in msg and "3 attempts" in msg and "\n" not in msg
    with pytest.raises(ConfigError) as e:
        remote.check_reachable(RewardConfig(type="remote", url=url, timeout_s=0.5))
    assert str(e.value).startswith(f"reward.url: no reward server answers at {url} ") and "\n" not in str(e.value)


def test_build_checks_the_url():
    from optune_nemo.reward import build_reward

    if HAVE_PYTRITON:
        with pytest.raises(ConfigError, match=r"^reward\.url: "):
            build_reward(RewardConfig(type="remote", url="https://x:1"))
    else:
        with pytest.raises(ConfigError, match=r"^reward\.type: remote needs PyTriton"):
            build_reward(RewardConfig(type="remote", url="http://x:1"))


# --------------------------------------------------------------------------- against a real server

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not HAVE_PYTRITON:
        pytest.skip(NO_PYTRITON)
    with RMServer(tmp_path_factory.mktemp("rm"), "reward.function._target_=serve_utils.thirds_reward",
                  "server.max_batch_size=4", "reward.batch_size=3") as s:
        yield s.start()


def test_remote_equals_local_rounded_to_float32(server):
    """Independent reference: the same rule function run locally (RuleReward), then rounded to float32 (the
    wire's type). Batches of 5 are split into the server's max_batch_size of 4."""
    from serve_utils import thirds_reward

    prompts, texts = _prompts(len(TEXTS)), TEXTS
    local = RuleReward(thirds_reward, name="thirds", batch_size=64).score(prompts, texts)
    r = _remote(server.url, batch_size=5, timeout_s=10, max_retries=0)
    r.prepare()
    got = r.score(prompts, texts)
    r.release()
    assert got == [float(np.float32(x)) for x in local]
    assert got != local                                  # len/3 is no float32: the rounding is real
    assert got == pytest.approx([len(t) / 3 for t in texts], rel=1e-7)
    assert r.request_size == 4 and r.calls == 3 and r.requests == 5     # 11 = 5 + 5 + 1 -> 4+1, 4+1, 1


def test_served_reward_failures_are_not_retried(server, monkeypatch):
    from optune_nemo.reward import remote

    pauses = []
    monkeypatch.setattr(remote, "_pause", pauses.append)
    r = _remote(server.url, timeout_s=10, max_retries=3)
    with pytest.raises(RewardError) as e:
        r.score(_prompts(3), ["a", "boom", "c"])
    assert not isinstance(e.value, RewardUnavailable)
    assert str(e.value) == (f"reward.url: the reward served at {server.url} (model 'reward') failed (config): "
                            "reward.function: serve_utils.thirds_reward raised KeyError: 'no answer for boom'")
    with pytest.raises(RewardError, match=r"failed \(config\): reward\.function: .* non-finite reward nan"):
        r.score(_prompts(2), ["a", "nan"])
    assert pauses == []
    assert r.score(_prompts(2), ["abc", "abcdef"]) == [1.0, 2.0]      # the server is fine afterwards


def test_served_reward_unavailable_is_retried(server, monkeypatch):
    """A served reward whose own service is down (RewardUnavailable on the server): retried like a server
    that does not answer, then RewardUnavailable naming both."""
    from optune_nemo.reward import remote

    pauses = []
    monkeypatch.setattr(remote, "_pause", pauses.append)
    r = _remote(server.url, timeout_s=10, max_retries=2)
    with pytest.raises(RewardUnavailable) as e:
        r.score(_prompts(2), ["a", "down"])
    assert pauses == [1.0, 2.0]
    assert str(e.value) == (f"reward.url: the reward server at {server.url} (model 'reward') did not score a batch "
                            "in 3 attempts (reward.timeout_s = 10 s each, reward.max_retries = 2): the served reward "
                            "is unavailable: the judge it calls is down")


def test_check_reachable(server):
    from optune_nemo.reward.remote import check_reachable

    check_reachable(RewardConfig(type="remote", url=server.url, timeout_s=10))
    grpc = f"grpc://127.0.0.1:{server.ports[1]}"
    check_reachable(RewardConfig(type="remote", url=grpc, timeout_s=10))
    with pytest.raises(ConfigError, match=r"^reward\.model_name: the server at .* has no ready model 'nope'"):
        check_reachable(RewardConfig(type="remote", url=server.url, model_name="nope", timeout_s=1))


def test_grpc_equals_http(server):
    texts = TEXTS[:5]
    http = _remote(server.url, timeout_s=10, max_retries=0).score(_prompts(5), texts)
    grpc = _remote(f"grpc://127.0.0.1:{server.ports[1]}", timeout_s=10, max_retries=0).score(_prompts(5), texts)
    assert http == grpc == [float(np.float32(len(t) / 3)) for t in texts]


def _two_rank_clients(rank, url):
    from optune_nemo.megatron.parallel import init_distributed
    from optune_nemo.reward.remote import RemoteReward

    dist = init_distributed(2, 1)            # tensor-parallel 2: a single data-parallel rank
    r = RemoteReward(url=url, model_name="reward", batch_size=4, timeout_s=20, max_retries=0, dist=dist)
    r.prepare()
    got = r.score(_prompts(len(TEXTS)), TEXTS)
    r.release()
    return got, r.scored


@pytest.mark.multiproc
def test_every_rank_is_a_client(server):
    """Two ranks of one data-parallel group (TP=2) each score half, not the same pairs twice; both get all."""
    from dist_utils import run_ranks

    (a, na), (b, nb) = run_ranks(_two_rank_clients, 2, server.url)
    assert a == b == [float(np.float32(len(t) / 3)) for t in TEXTS]
    assert (na, nb) == (6, 5)


@needs_pytriton
def test_server_down_then_back(tmp_path, monkeypatch):
    """A server killed between batches: the next batch fails after its retries (RewardUnavailable); the same
    client scores again once a server is back on the same port."""
    from optune_nemo.reward import remote

    ports = free_ports(3)
    with RMServer(tmp_path, "reward.function._target_=serve_utils.thirds_reward", ports=ports) as first:
        first.start()
        r = _remote(first.url, timeout_s=5, max_retries=1)
        r.prepare()
        assert r.score(_prompts(2), ["abc", "x"]) == [1.0, float(np.float32(1 / 3))]
        first.kill()
        wait_until_listening_stops(ports[0])
        pauses = []
        monkeypatch.setattr(remote, "_pause", pauses.append)
        with pytest.raises(RewardUnavailable) as e:
            r.score(_prompts(1), ["abc"])
        assert pauses == [1.0] and first.url in str(e.value) and "\n" not in str(e.value)
    with RMServer(tmp_path, "reward.function._target_=serve_utils.thirds_reward", ports=ports) as second:
        second.start()
        assert r.score(_prompts(2), ["abcdef", ""]) == [2.0, 0.0]
        r.release()


@needs_pytriton
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly(tmp_path, sig):
    """Exit 0, Triton and its stub gone, PyTriton's workspace removed, the ports free again."""
    with RMServer(tmp_path, "reward.function._target_=optune_nemo.reward.rules.length_reward") as s:
        s.start()
        workspaces = list(s.pytriton_home.glob("workspace_*"))
        assert len(workspaces) == 1
        assert s.stop(sig) == 0, s.text()[-3000:]
        assert f"stopped by {sig.name}" in s.text()
        assert not workspaces[0].exists()
        assert s.left_behind is False
        for port in s.ports:
            with socket.socket() as c:
                assert c.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize("overrides,line", [
    (["reward.type=remote"], "serve_rm: configuration error: reward.type: serve_rm serves one of rule, hf, "
                             "megatron (got 'remote')"),
    (["server.bogus=1"], "serve_rm: configuration error: server.bogus: unknown key (keys under server: host, "
                         "http_port, grpc_port, metrics_port, model_name, max_batch_size, keepalive_s)"),
])
def test_bad_configuration_is_one_line_exit_2(tmp_path, overrides, line):
    with RMServer(tmp_path, *overrides) as s:
        assert s.start(wait=False).proc.wait(timeout=120) == 2
        assert s.text().strip().splitlines() == [line]


@needs_pytriton
def test_port_in_use_is_one_line_exit_2(tmp_path):
    ports = free_ports(3)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports[2]))
        taken.listen()
        with RMServer(tmp_path, ports=ports) as s:
            assert s.start(wait=False).proc.wait(timeout=120) == 2
    lines = s.text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"serve_rm: configuration error: server.metrics_port: cannot listen on 127.0.0.1:{ports[2]} "), lines


@needs_pytriton
@pytest.mark.parametrize("rtype", ["hf", "megatron"])
def test_served_reward_models_equal_local(rtype, tmp_path):
    """A tiny HF sequence-classification reward model served as `reward.type=hf` / `megatron` scores what the
    same reward type built locally scores (same batches: one request, reward.batch_size 3 on both sides),
    rounded to float32."""
    from rm_tiny import save_hf_rm

    from optune_nemo.megatron.parallel import init_distributed
    from optune_nemo.reward import build_reward

    rm = save_hf_rm("llama_untied", tmp_path / "rm", seed=8)
    prompts = [Prompt(i, f"what is {i} plus {i}", (), {}) for i in range(7)]
    responses = ["it is two", "four", "", "the answer is six", "eight", "ten ten ten", "twelve"]
    local = build_reward(RewardConfig(type=rtype, path=str(rm), batch_size=3), dist=init_distributed(1, 1))
    local.prepare()
    want = local.score(prompts, responses)
    local.release()
    with RMServer(tmp_path, f"reward.type={rtype}", f"reward.path={rm}", "reward.batch_size=3") as server:
        server.start()
        r = _remote(server.url, timeout_s=30, max_retries=0)
        got = r.score(prompts, responses)
        r.release()
    assert r.requests == 1
    assert got == [float(np.float32(x)) for x in want]
    assert len(set(got)) > 3                            # a real model: scores differ (unknown words do not)


def test_a_model_of_another_shape_is_refused():
    """At start-up another model under the name is a ConfigError (exit 2, nothing written); in the middle of
    a run it is RewardUnavailable (exit 1, everything kept)."""
    from types import SimpleNamespace as NS

    from optune_nemo.reward.remote import _check_model_config

    ours = NS(inputs=[NS(name="prompts"), NS(name="responses")], outputs=[NS(name="rewards")], max_batch_size=8)
    _check_model_config(ours, "http://h:1", "reward", error=ConfigError)
    other = NS(inputs=[NS(name="texts")], outputs=[NS(name="scores")], max_batch_size=8)
    for error in (ConfigError, RewardUnavailable):
        with pytest.raises(error, match=r"^reward\.url: model 'reward' at http://h:1 is no optune_nemo reward server"):
            _check_model_config(other, "http://h:1", "reward", error=error)
    with pytest.raises(ConfigError):
        _check_model_config(NS(**{**vars(ours), "max_batch_size": 0}), "http://h:1", "reward", error=ConfigError)
