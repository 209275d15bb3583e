"""`reward.type=remote` end to end: `python -m optune_nemo.serve_rm` started for real on localhost, and
`python -m optune_nemo.train` on the tiny model scoring through it.

(a) a remote run equals a local run of the same rule reward (rewards rounded to float32, the wire's type);
(b) the server dies in the middle of iteration 1 -> one line and exit 1, everything kept; a server back on
    the same port and the same command again -> the run completes with the store and metrics of an
    uninterrupted run, and nothing finished is generated or scored again (the servers record every call);
(c) no server at start-up -> one line naming reward.url, exit 2, nothing written.
Also: a reward model split over two processes (torchrun) serves like one.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from serve_utils import HAVE_PYTRITON, NO_PYTRITON, ROOT, RMServer, free_ports, read_record, wait_until_listening_stops
from test_optune_loop import E2E, _metrics, _store

from optune_nemo.reward.rules import length_reward

pytestmark = [pytest.mark.skipif(not HAVE_PYTRITON, reason=NO_PYTRITON), pytest.mark.slow]

TARGET = 6                       # E2E's ++reward.function.target_chars
REMOTE = ["reward.type=remote", "reward.timeout_s=5", "reward.max_retries=1"]


def _train(exp_dir, *overrides):
    return subprocess.run([sys.executable, "-m", "optune_nemo.train", *E2E, f"exp_dir={exp_dir}", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _served(record, die_at_call=0):
    """serve_rm overrides: E2E's length reward, each call recorded (and the server killed at call N)."""
    return ["reward.function._target_=serve_utils.recorded_length_reward", f"++reward.function.record={record}",
            f"++reward.function.target_chars={TARGET}", f"++reward.function.die_at_call={die_at_call}"]


def _f32(x):
    return float(np.float32(x))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A remote run from start to end, and the calls its server received."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    with RMServer(tmp, *_served(tmp / "calls.jsonl")) as server:
        server.start()
        proc = _train(tmp / "run", *REMOTE, f"reward.url={server.url}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run", read_record(tmp / "calls.jsonl")


def test_remote_run_equals_local_run(uninterrupted, tmp_path):
    remote_dir, calls = uninterrupted
    proc = _train(tmp_path / "local")
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote, local = _store(remote_dir), _store(tmp_path / "local")
    assert calls and sum(len(c) for c in calls) == 16 * 2 + 8 * 2 * 2       # iteration 0: all, then K = 8
    for key in ("reward_a", "reward_b"):
        texts = remote[key.replace("reward", "response")]
        assert remote[key] == [_f32(x) for x in local[key]]
        assert remote[key] == [_f32(x) for x in length_reward([], texts, [], target_chars=TARGET)]
        assert remote[key] != local[key]                 # -k/6: the float32 rounding is real
    # every sample's reward (store schema 2) travels as float32 too
    assert remote["rewards"] == [[_f32(x) for x in row] for row in local["rewards"]]
    assert {k: v for k, v in remote.items() if not k.startswith("reward")} == \
           {k: v for k, v in local.items() if not k.startswith("reward")}
    for rr, rl in zip(_metrics(remote_dir), _metrics(tmp_path / "local"), strict=True):
        for key in rl:
            if key.startswith("reward_"):                # means of float32-rounded rewards
                assert rr[key] == pytest.approx(rl[key], abs=1e-6), key
            else:                                        # training sees float32 rewards either way
                assert rr[key] == rl[key], key


def test_server_dies_mid_iteration_then_rerun_resumes(uninterrupted, tmp_path):
    reference_dir, reference_calls = uninterrupted
    assert len(reference_calls) == 7          # chunks of 6: iteration 0 has 3 (16 prompts), 1 and 2 have 2 (8)
    exp, ports = tmp_path / "run", free_ports(3)
    command = [*REMOTE, f"reward.url=http://127.0.0.1:{ports[0]}"]
    first, second = tmp_path / "calls1.jsonl", tmp_path / "calls2.jsonl"

    # the server dies on receiving call 5: chunk 1 of iteration 1 (its chunk 0 is on disk by then)
    with RMServer(tmp_path / "s1", *_served(first, die_at_call=5), ports=ports) as server:
        server.start()
        proc = _train(exp, *command)
        server.kill()
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"optune_nemo: error: reward.url: the reward server at http://127.0.0.1:{ports[0]} "), last
    assert last.endswith("(everything generated so far is kept: rerun the same command to resume)")
    assert "Traceback" not in proc.stderr
    partial = exp / "partial" / "iter_000001"
    assert sorted(p.name for p in partial.iterdir()) == ["chunk_00000.json", "chunk_00001.json"]
    assert json.loads((partial / "chunk_00001.json").read_text())["rewards"] is None   # generated, not scored
    assert sorted(p.name for p in (exp / "checkpoints").iterdir() if p.name.startswith("iter_")) == ["iter_000000"]
    assert not (exp / "COMPLETED").exists()

    wait_until_listening_stops(ports[0])
    with RMServer(tmp_path / "s2", *_served(second), ports=ports) as server:
        server.start()
        proc = _train(exp, *command)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "iteration 1: chunk" not in proc.stderr            # nothing of iteration 1 was generated again
    assert "iteration 2: chunk 0 of 2 generated" in proc.stderr

    assert _store(exp) == _store(reference_dir)
    assert _metrics(exp) == _metrics(reference_dir)
    # what each server scored, against the uninterrupted run's calls (sampling is seeded per prompt, so
    # a chunk made again would be the same responses): the first server got calls 1-5 (it died in 5);
    # the rerun scored call 5 again (the chunk in flight: generated and kept, never scored) and then 6-7
    # only -- iteration 0 and chunk 0 of iteration 1 were neither generated nor scored again
    assert read_record(first) == reference_calls[:5]
    assert read_record(second) == reference_calls[4:]


def test_unreachable_server_at_start_up(tmp_path):
    url = f"http://127.0.0.1:{free_ports(1)[0]}"
    proc = _train(tmp_path / "run", "reward.type=remote", f"reward.url={url}", "reward.timeout_s=1")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"optune_nemo: configuration error: reward.url: no reward server answers at {url} "), lines
    assert not (tmp_path / "run").exists()


@pytest.mark.multiproc
def test_two_process_server(tmp_path):
    """torchrun with 2 processes (data-parallel 2): rank 0 serves, both score half of each request; the
    answer equals the rule run locally; SIGTERM to torchrun stops everything cleanly."""
    from serve_utils import ranked_reward

    from optune_nemo.config import RewardConfig
    from optune_nemo.interfaces import Prompt
    from optune_nemo.reward.remote import build

    record = tmp_path / "ranks.jsonl"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                str(free_ports(1)[0]), "-m", "optune_nemo.serve_rm"]
    with RMServer(tmp_path, "reward.function._target_=serve_utils.ranked_reward",
                  f"++reward.function.record={record}", "server.keepalive_s=0.5", cmd=torchrun) as server:
        server.start()
        workspaces = list(server.pytriton_home.glob("workspace_*"))
        r = build(RewardConfig(type="remote", url=server.url, timeout_s=20, max_retries=0))
        prompts = [Prompt(i, "q" * i, (), {}) for i in range(7)]
        texts = [f"response {'x' * i}" for i in range(7)]
        assert r.score(prompts, texts) == [_f32(x) for x in ranked_reward([p.text for p in prompts], texts, [],
                                                                           record=os.devnull)]
        time.sleep(2)                             # several keep-alive pings while idle
        assert r.score(prompts[:3], texts[:3]) == [_f32(len(t) + i / 1000) for i, t in enumerate(texts[:3])]
        r.release()
        assert sorted(map(tuple, read_record(record))) == [(0, 2), (0, 4), (1, 1), (1, 3)]
        server.stop(signal.SIGTERM)           # torchrun's own exit code on a signal: 1 (not ours)
        assert server.left_behind is False
        assert workspaces and not workspaces[0].exists()
        log = server.text()
        assert "stopped by SIGTERM" in log
        pings = re.search(r"2 requests served, (\d+) keep-alive pings", log)
        assert pings and int(pings.group(1)) >= 1, log[-3000:]
        assert not re.search(r'File ".*/optune_nemo/', log), log[-3000:]      # no traceback through our code
