"""`python -m optune_nemo.serve_rm` started from tests: free ports, waiting for the readiness line, stopping
by signal or by SIGKILL of its whole process group; and the rule rewards served in tests (the server
imports them by name: tests/ is on its PYTHONPATH)."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HAVE_PYTRITON = importlib.util.find_spec("pytriton") is not None
NO_PYTRITON = "needs PyTriton (the serve extra: pip install -e '.[serve]')"


EPHEMERAL = tuple(int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()) \
    if Path("/proc/sys/net/ipv4/ip_local_port_range").is_file() else (32768, 60999)


def free_ports(n: int) -> list[int]:
    """`n` distinct ports nothing listens on, drawn BELOW the kernel's ephemeral range: a port the kernel
    hands out itself (bind to port 0, the source port of any outgoing connection, e.g. the other xdist
    worker's gloo and torchrun rendezvous traffic) can be taken again between this choice and the server's
    bind; one outside that range cannot (a clean-clone run once lost a Triton gRPC port that way)."""
    import random

    rng = random.Random()
    socks, ports = [], []
    try:
        while len(ports) < n:
            port = rng.randrange(15000, min(EPHEMERAL[0], 32000))
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            socks.append(s)
            ports.append(port)
        return ports
    finally:
        for s in socks:
            s.close()


class RMServer:
    """One `serve_rm` process (a new session: its Triton server and Python stub are in its process group)."""

    def __init__(self, workdir: Path, *overrides: str, ports: list[int] | None = None, cmd: list[str] | None = None,
                 env: dict | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ports = ports or free_ports(3)
        self.overrides = list(overrides)
        self.cmd = cmd or [sys.executable, "-m", "optune_nemo.serve_rm"]
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self._tmp_before: set[Path] = set()
        self.left_behind: bool | None = None
        """After `stop`: whether processes of the server's group outlived it."""
        self.log = self.workdir / f"serve_rm_{self.ports[0]}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports[0]}"

    @functools.cached_property
    def pytriton_home(self) -> Path:
        # PyTriton puts Unix sockets in its workspace: a path under pytest's tmp_path may exceed their
        # 108-byte limit (`OSError: AF_UNIX path too long` when the model loads)
        home = Path(tempfile.mkdtemp(prefix="pyt", dir="/tmp"))
        (self.workdir / "pytriton_home").write_text(str(home))
        return home

    def args(self) -> list[str]:
        http, grpc, metrics = self.ports
        return [*self.cmd, f"server.http_port={http}", f"server.grpc_port={grpc}", f"server.metrics_port={metrics}",
                *self.overrides]

    def start(self, *, wait: bool = True, timeout: float = 180) -> RMServer:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
               "PYTRITON_HOME": str(self.pytriton_home), "OMP_NUM_THREADS": "1", **self.env}
        self._tmp_before = set(Path("/tmp").glob("python_env_*"))
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.args(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        if wait:
            self.wait_ready(timeout)
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_ready(self, timeout: float = 180) -> None:
        from optune_nemo.rm.serve import READY

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if READY in self.text():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve_rm exited with {self.proc.returncode}:\n{self.text()[-4000:]}")
            time.sleep(0.2)
        self.kill()
        raise TimeoutError(f"serve_rm not ready after {timeout} s:\n{self.text()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90) -> int:
        """Signal the serve_rm process (not its group) and return its exit code; SIGKILL the group after."""
        try:
            self.proc.send_signal(sig)
            code = self.proc.wait(timeout=timeout)
            deadline = time.monotonic() + 10     # the group's last processes may take a moment to exit
            while group_alive(self.proc.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            self.left_behind = group_alive(self.proc.pid)
            return code
        finally:
            self.kill()

    def kill(self) -> None:
        """SIGKILL everything the server started, and remove what Triton leaves in /tmp when killed."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)
        self._remove_triton_tmp()

    def _remove_triton_tmp(self) -> None:
        # Triton copies the model's config to /tmp/folderXXXXXX and the Python backend makes an empty
        # /tmp/python_env_XXXXXX; both go at a clean stop, not at a SIGKILL. Only ours are removed: the
        # config names our workspace, and empty env dirs made while our server ran.
        import shutil

        home = str(self.pytriton_home)
        for d in Path("/tmp").glob("folder*"):
            try:
                if f'string_value: "{home}/' in (d / "config.pbtxt").read_text():
                    shutil.rmtree(d, ignore_errors=True)
            except OSError:
                pass
        for d in set(Path("/tmp").glob("python_env_*")) - self._tmp_before:
            try:
                d.rmdir()
            except OSError:
                pass

    def __enter__(self) -> RMServer:
        """Lifetime only (start with `start`): on exit everything is stopped and PyTriton's home removed."""
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop(signal.SIGTERM)
        self.kill()
        self.remove_home()

    def remove_home(self) -> None:
        import shutil

        if "pytriton_home" in self.__dict__:
            shutil.rmtree(self.pytriton_home, ignore_errors=True)


def group_alive(pgid: int) -> bool:
    """Whether a process of process group `pgid` is alive (zombies included: they are not reaped yet)."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.getpgid(int(pid)) == pgid:
                    return True
            except ProcessLookupError:
                pass
    return False


def wait_until_listening_stops(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"port {port} still answers")


# --------------------------------------------------------------------------- served in tests

def recorded_length_reward(prompts, responses, metadata, *, record: str, die_at_call: int = 0,
                           target_chars: int = 32):
    """`rules.length_reward`, appending each call's responses to `record` (one JSON line per call). At call
    number `die_at_call` (1-based; 0: never) the whole server (its process group: Python, tritonserver,
    the stub) is SIGKILLed before it answers: a server that dies in the middle of a request."""
    from optune_nemo.reward.rules import length_reward

    with open(record, "a") as f:
        f.write(json.dumps(list(responses)) + "\n")
    with open(record) as f:
        calls = sum(1 for _ in f)
    if die_at_call and calls == die_at_call:
        os.killpg(os.getpgrp(), signal.SIGKILL)
    return length_reward(prompts, responses, metadata, target_chars=target_chars)


def read_record(record: Path) -> list[list[str]]:
    return [json.loads(line) for line in Path(record).read_text().splitlines()] if Path(record).exists() else []


def thirds_reward(prompts, responses, metadata):
    """len(response) / 3 (mostly not a float32 number), but raises on a response "boom", returns NaN for
    "nan", and says a service it needs is down for "down"."""
    if "down" in responses:
        from optune_nemo.reward.base import RewardUnavailable

        raise RewardUnavailable("the judge it calls is down")
    if "boom" in responses:
        raise KeyError("no answer for boom")
    return [float("nan") if r == "nan" else len(r) / 3 for r in responses]


def ranked_reward(prompts, responses, metadata, *, record: str):
    """len(response) + len(prompt) / 1000, appending (this process's global rank, number of responses) to
    `record` for each call: which ranks of a multi-process server scored what."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    with open(record, "a") as f:
        f.write(json.dumps([rank, len(responses)]) + "\n")
    return [len(r) + len(p) / 1000 for p, r in zip(prompts, responses)]
