"""Run a function on N gloo ranks in fresh processes (megatron keeps global parallel state, so
every multi-rank test gets its own processes)."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, world_size: int, *args, timeout: float = 300) -> list:
    """`fn(rank, *args)` on each of `world_size` ranks (RANK/WORLD_SIZE/MASTER_* set, one thread
    each); returns the ranks' return values. `fn` must be importable by module and name."""
    import inspect

    port = _free_port()
    fn_dir = str(Path(inspect.getfile(fn)).resolve().parent)
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.pkl"
        job.write_bytes(pickle.dumps((fn.__module__, fn.__qualname__, args)))
        script = textwrap.dedent(f"""
            import importlib, os, pickle, sys, traceback
            sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}, {fn_dir!r}]
            mod, name, args = pickle.load(open({str(job)!r}, "rb"))
            rank = int(os.environ["RANK"])
            try:
                out = getattr(importlib.import_module(mod), name)(rank, *args)
                pickle.dump(("ok", out), open(f"{tmp}/out{{rank}}.pkl", "wb"))
            except BaseException:
                pickle.dump(("error", traceback.format_exc()), open(f"{tmp}/out{{rank}}.pkl", "wb"))
                raise
        """)
        procs = []
        for rank in range(world_size):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
            procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, cwd=tmp,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        logs = []
        for p in procs:
            try:
                logs.append(p.communicate(timeout=timeout)[0])
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise RuntimeError(f"ranks timed out after {timeout} s") from None
        results = []
        for rank in range(world_size):
            path = Path(tmp) / f"out{rank}.pkl"
            if not path.exists():
                raise RuntimeError(f"rank {rank} died (exit {procs[rank].returncode}):\n{logs[rank][-4000:]}")
            status, value = pickle.loads(path.read_bytes())
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results.append(value)
        return results
