"""Hydra entry point: `python -m optune_nemo.serve_rm key=value ...` serves a reward (`reward.type=rule`, `hf`
or `megatron`, built by `optune_nemo.reward.build_reward`) for `reward.type=remote` runs, with PyTriton:
NVIDIA Triton Inference Server running the reward as a Python model, KServe v2 over HTTP and gRPC.

One process serves a rule or HF reward; a Megatron reward model split over several processes (torchrun /
srun) serves from all of them: rank 0 runs Triton and hands every request to the others, every rank
scores its share (`ShardedReward`: data-parallel sharding, tensor / pipeline ranks together).

The wire format is `optune_nemo/reward/remote.py`'s; docs/serving.md has commands, ports and GPU notes.
Once the model answers, rank 0 logs `ready: model '<name>' ...` (what scripts and tests wait for).
SIGTERM or SIGINT stops the server cleanly (Triton unloads the model, PyTriton removes its workspace).

Exit codes: 0 stopped by a signal; 2 the configuration is wrong (one line naming the key, e.g. a port in
use); 1 anything else (Triton died, a bug).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import sys
import sysconfig
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from optune_nemo.config import CONF_DIR, ConfigError
from optune_nemo.interfaces import Prompt
from optune_nemo.rm.serve_config import ServerConfig, ServeRMConfig, register_schema, validate_serve
from optune_nemo.runner import captured, run_hydra_main
from optune_nemo.runtime.rundir import rank_from_env, world_size_from_env

log = logging.getLogger("optune_nemo.rm.serve")

READY = "ready: model"
"""How the readiness log line starts."""


# --------------------------------------------------------------------------- environment

def _default_lib_dirs() -> set[str]:
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    return {"/lib", "/usr/lib", "/lib64", "/usr/lib64", f"/lib/{multiarch}", f"/usr/lib/{multiarch}"}


def libpython_dir(environ: dict | None = None) -> str | None:
    """The directory to put first on LD_LIBRARY_PATH before Triton starts, or None when none is needed.

    Triton's Python backend stub (a separate program PyTriton ships per Python minor version) links
    `libpython3.X.so.1.0` and the dynamic loader looks for it on LD_LIBRARY_PATH, then in the system's
    directories. An interpreter whose shared libpython lives elsewhere (pyenv, conda, a source build:
    it finds its own through an RPATH the stub lacks) would have the stub load the system's libpython of
    the same minor version with this interpreter's standard library, which breaks (e.g. `'_thread.RLock'
    object has no attribute '_recursion_count'` with pyenv 3.11.7 against Debian's 3.11.2). Needed when
    this interpreter has a shared libpython outside the system's directories and LD_LIBRARY_PATH lacks it.
    """
    environ = os.environ if environ is None else environ
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if not (libdir and soname and ".so" in soname and (Path(libdir) / soname).is_file()):
        return None                      # a static interpreter: no shared libpython to point the stub at
    if str(Path(libdir)) in _default_lib_dirs():
        return None
    if libdir in environ.get("LD_LIBRARY_PATH", "").split(":"):
        return None
    return libdir


def _expose_libpython() -> None:
    libdir = libpython_dir()
    if libdir is not None:
        old = os.environ.get("LD_LIBRARY_PATH")
        os.environ["LD_LIBRARY_PATH"] = libdir + (f":{old}" if old else "")
        log.info("LD_LIBRARY_PATH starts with %s: Triton's Python stub must load this interpreter's libpython",
                 libdir)


def check_ports_free(s: ServerConfig) -> None:
    """Raise ConfigError naming the first port something already listens on (Triton would fail later, with
    an unrelated error, and its client could reach the other server)."""
    for key in ("http_port", "grpc_port", "metrics_port"):
        port = getattr(s, key)
        try:
            family, kind, proto, _, address = socket.getaddrinfo(s.host, port, type=socket.SOCK_STREAM)[0]
        except socket.gaierror as e:
            raise ConfigError(f"server.host: cannot resolve {s.host!r} ({e.strerror})") from None
        with socket.socket(family, kind, proto) as sock:
            # connections of an earlier server still in TIME_WAIT do not stop Triton (it reuses the address)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as e:
                raise ConfigError(f"server.{key}: cannot listen on {s.host}:{port} ({e.strerror}); "
                                  "choose another port or stop what uses it") from None


# --------------------------------------------------------------------------- scoring on every rank

def _stopping() -> Exception:
    """What a request gets when the server stops before scoring it: its client retries."""
    from optune_nemo.reward.base import RewardUnavailable

    return RewardUnavailable("the reward server is stopping")


class Scorer:
    """The served reward on every rank, always run by the main thread, as in training: the current CUDA
    device, megatron's CPU compatibility layer (a torch function mode) and other thread-local state are
    the main thread's.

    Triton calls `submit` from its request thread; rank 0's main thread runs each request in `run_next`
    and hands it to the other ranks, which wait in `follow`. While no request comes, `run_next` pings
    them every `keepalive_s`, so the process group's timeout never fires on an idle server; `stop`
    lets them return and fails requests still queued (their clients retry)."""

    def __init__(self, reward, dist, *, keepalive_s: float):
        self.reward, self.dist, self.keepalive_s = reward, dist, keepalive_s
        self.queue: queue.Queue = queue.Queue()
        self.closed = False
        self.closing = threading.Lock()   # no request may be queued after `close` has emptied the queue
        self.last = time.monotonic()
        self.served = 0
        """Requests scored (rank 0)."""
        self.pings = 0
        """Keep-alive pings sent (rank 0)."""

    @property
    def many(self) -> bool:
        return self.dist is not None and self.dist.world_size > 1

    def submit(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        """Any thread: the rewards, once the main thread has scored them (its exception otherwise)."""
        job: Future = Future()
        with self.closing:
            if self.closed:
                raise _stopping()
            self.queue.put((job, list(prompts), list(responses)))
        return job.result()

    def run_next(self, timeout: float) -> None:
        """Rank 0's main thread: score the next request, waiting at most `timeout` for one."""
        from optune_nemo.runtime.distributed import broadcast_object

        try:
            job, prompts, responses = self.queue.get(timeout=timeout)
        except queue.Empty:
            if self.many and time.monotonic() - self.last > self.keepalive_s:
                broadcast_object(("ping",))
                self.pings += 1
                self.last = time.monotonic()
            return
        try:
            if self.many:
                broadcast_object(("score", prompts, responses))
            job.set_result(self.reward.score(prompts, responses))
            self.served += 1
        except Exception as e:
            job.set_exception(e)
        except BaseException:          # a stop signal: the request thread must not wait forever
            job.set_exception(_stopping())
            raise
        finally:
            self.last = time.monotonic()

    def follow(self) -> None:
        """Ranks > 0: score what rank 0 hands over until it stops."""
        from optune_nemo.runtime.distributed import broadcast_object

        while True:
            message = broadcast_object(None)
            if message is None:
                return
            if message[0] == "score":
                try:
                    self.reward.score(message[1], message[2])
                except Exception as e:   # the same error reached rank 0, which reports it to the client
                    log.debug("the request failed on every rank: %s", e)

    def close(self) -> None:
        """Rank 0, before Triton stops (its request threads wait on queued requests): fail what is queued and
        refuse what comes."""
        with self.closing:
            self.closed = True
            while not self.queue.empty():
                self.queue.get_nowait()[0].set_exception(_stopping())

    def stop(self) -> None:
        """Rank 0: close, and release the other ranks."""
        from optune_nemo.runtime.distributed import broadcast_object

        self.close()
        if self.many:
            try:
                broadcast_object(None)
            except Exception as e:       # the other ranks were stopped by the same signal already
                log.debug("could not tell the other ranks to stop: %s", e)


# --------------------------------------------------------------------------- Triton on rank 0

def _infer_function(scorer: Scorer):
    """The Triton model: (prompts, responses) [B, 1] bytes -> rewards [B, 1] float32."""
    import numpy as np
    from pytriton.decorators import batch

    from optune_nemo.reward.base import RewardUnavailable
    from optune_nemo.reward.remote import SERVER_ERROR_MARK, prompt_from_wire, response_from_wire

    @batch
    def infer(prompts, responses):
        try:
            ps = [prompt_from_wire(x) for x in prompts[:, 0]]
            rs = [response_from_wire(x) for x in responses[:, 0]]
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{SERVER_ERROR_MARK} request: {e}") from None
        try:
            scores = scorer.submit(ps, rs)
        except RewardUnavailable as e:     # a service behind the reward is down: the client retries
            log.warning("the served reward is unavailable: %s", e)
            raise RuntimeError(f"{SERVER_ERROR_MARK} unavailable: {e}") from None
        except ConfigError as e:
            log.warning("the served reward failed: %s", e)
            raise RuntimeError(f"{SERVER_ERROR_MARK} config: {e}") from None
        except Exception as e:
            log.warning("the served reward failed: %s: %s", type(e).__name__, e)
            raise RuntimeError(f"{SERVER_ERROR_MARK} error: {type(e).__name__}: {e}") from None
        return {"rewards": np.asarray(scores, dtype=np.float32).reshape(-1, 1)}

    return infer


class _Stop(BaseException):
    """A stop signal arrived (a BaseException, like KeyboardInterrupt: no `except Exception` may swallow it)."""


def _on_signal(signum, frame):
    for sig in (signal.SIGTERM, signal.SIGINT):     # a second signal must not interrupt the clean-up
        signal.signal(sig, signal.SIG_IGN)
    raise _Stop(signal.Signals(signum).name)


def _what(cfg: ServeRMConfig) -> str:
    r = cfg.reward
    if r.type == "rule":
        return f"rule {dict(r.function).get('_target_')}"
    return f"{r.type} {r.path}"


_EXIT_TIMEOUT_S = 5
"""Seconds Triton waits at shutdown before it exits anyway. Its default, 30 s, is spent in full whenever a
client still holds a connection (a run between two batches); after a stop signal nothing is scored any
more, so waiting buys nothing."""


def run_triton(cfg: ServeRMConfig, scorer: Scorer) -> None:
    """Serve on rank 0 until a signal, or until Triton dies (RuntimeError)."""
    import numpy as np
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    s = cfg.server
    config = TritonConfig(http_address=s.host, http_port=s.http_port, grpc_address=s.host, grpc_port=s.grpc_port,
                          metrics_address=s.host, metrics_port=s.metrics_port, exit_timeout_secs=_EXIT_TIMEOUT_S)
    with Triton(config=config) as triton:
        triton.bind(model_name=s.model_name, infer_func=_infer_function(scorer),
                    inputs=[Tensor(name="prompts", dtype=bytes, shape=(1,)),
                            Tensor(name="responses", dtype=bytes, shape=(1,))],
                    outputs=[Tensor(name="rewards", dtype=np.float32, shape=(1,))],
                    config=ModelConfig(max_batch_size=s.max_batch_size), strict=True)
        log.info("%s %r (%s, %d process%s) at http://%s:%d and grpc://%s:%d, metrics at http://%s:%d/metrics",
                 READY, s.model_name, _what(cfg), scorer.dist.world_size if scorer.dist else 1,
                 "es" if scorer.many else "", s.host, s.http_port, s.host, s.grpc_port, s.host, s.metrics_port)
        try:
            while triton.is_alive():
                scorer.run_next(timeout=1.0)
        finally:
            scorer.close()
    raise RuntimeError("Triton Inference Server stopped unexpectedly (its log is above)")


def serve(cfg: ServeRMConfig) -> None:
    """Build the reward on every rank and serve it (rank 0) until SIGTERM / SIGINT."""
    from optune_nemo.reward.remote import HAVE_PYTRITON
    from optune_nemo.runtime.console import setup_logging

    world, rank = world_size_from_env(), rank_from_env()
    validate_serve(cfg, world_size=world)
    if not HAVE_PYTRITON:
        raise ConfigError("server: serving needs PyTriton; pip install 'optune-nemo[serve]' (nvidia-pytriton)")
    setup_logging(rank, cfg.log_level, run_log=False)     # a server has no run directory for a log file
    if rank == 0:
        check_ports_free(cfg.server)
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)      # also when started in the background (SIGINT ignored)
        _expose_libpython()
    try:
        _build_and_serve(cfg)
    except _Stop as e:
        log.info("stopped by %s", e)


def _build_and_serve(cfg: ServeRMConfig) -> None:
    from optune_nemo.megatron.parallel import init_distributed
    from optune_nemo.reward import build_reward

    p = cfg.parallel
    dist = init_distributed(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                            timeout_minutes=p.distributed_timeout_minutes)
    reward = build_reward(cfg.reward, dist=dist)
    scorer = Scorer(reward, dist, keepalive_s=cfg.server.keepalive_s)
    reward.prepare()
    try:
        if dist.rank == 0:
            run_triton(cfg, scorer)
        else:
            scorer.follow()
    finally:
        if dist.rank == 0:
            log.info("%d requests served, %d keep-alive pings; stopping", scorer.served, scorer.pings)
            scorer.stop()
        reward.release()


# --------------------------------------------------------------------------- command line


def to_config(dcfg: DictConfig) -> ServeRMConfig:
    cfg = OmegaConf.to_object(dcfg)
    assert isinstance(cfg, ServeRMConfig)
    return cfg


register_schema()


@hydra.main(config_path=str(CONF_DIR), config_name="serve_rm", version_base=None)
@captured
def _hydra_main(dcfg: DictConfig) -> None:
    serve(to_config(dcfg))


def main() -> int:
    """`python -m optune_nemo.serve_rm`: Hydra's command line with this module's exit codes (docstring)."""
    return run_hydra_main(_hydra_main, prog="serve_rm", schema=ServeRMConfig)


if __name__ == "__main__":
    sys.exit(main())
