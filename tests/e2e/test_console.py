"""The console shows the run, not the libraries: a tiny run's stdout + stderr hold its own lines (one per
phase and iteration, the held-out result, the closing summary) and none of megatron's configuration dumps,
bucket listings, missing Transformer Engine / Apex notices or Python warnings; those are in
exp_dir/logs/rank<R>.log instead, and reach the console with logging.level=DEBUG. A second data-parallel
rank prints nothing on a clean run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from dist_utils import _free_port

ROOT = Path(__file__).resolve().parents[2]

RUN = ["policy.hf_path=null", "precision=fp32", "model.num_layers=2", "model.hidden_size=64",
       "model.ffn_hidden_size=96", "model.num_attention_heads=4", "model.num_query_groups=2",
       "data.num_prompts=8", "eval.num_prompts=4", "eval.max_new_tokens=4", "generation.max_new_tokens=8",
       "train.global_batch_size=4", "train.micro_batch_size=2", "logging.progress=false",
       "logging.tensorboard=false", "policy.export_hf_final=false"]

# third-party chatter the tiny run produces on CPU (megatron-core 0.16, no Transformer Engine or Apex)
CHATTER = ["Params for bucket", "OptimizerConfig(", "DistributedDataParallelConfig(",
           "Transformer Engine and Apex are not installed", "Apex is not installed", "UserWarning"]
# never on the console at INFO, whether or not this run produces them
NEVER = [*CHATTER, "Transformer Engine", "Apex", "FutureWarning", "DeprecationWarning", "warnings.warn",
         "megatron.core", "Traceback"]


def _train(exp, *args, env=None, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "optune_nemo.train", f"exp_dir={exp}", *RUN, *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})
    console = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 0, "\n".join(console[-60:])
    return console


@pytest.fixture(scope="module")
def info_run(tmp_path_factory):
    exp = tmp_path_factory.mktemp("console") / "run"
    return exp, _train(exp, "optune.iterations=2")


def test_console_holds_the_runs_own_lines_only(info_run):
    exp, console = info_run
    text = "\n".join(console)
    assert not [line for line in console if any(n in line for n in NEVER)], text
    for needle in ("iteration 0: phase=generation, regenerating 8 of 8 prompts", "iteration 0: phase=reference",
                   "iteration 0: phase=train on", "iteration 1: phase=generation, regenerating 4 of 8 prompts",
                   "iteration 1: done in", "held-out baseline", "held-out after iteration 1", "run summary",
                   "done: 2 iterations, 12 prompts regenerated", "held-out (4 prompts)", str(exp / "logs")):
        assert needle in text, f"{needle!r} not on the console:\n{text}"
    # 2 data lines, 2 iterations x (3 phases + done + held-out), the baseline, and the summary: the table's
    # header, start row and 2 rows, its title and 3 closing lines
    assert len(console) <= 26, text
    table = console[[i for i, line in enumerate(console) if "run summary" in line][0] + 1:]
    assert table[0].split()[:2] == ["iteration", "regenerated"] and table[1].split()[0] == "start"
    assert [row.split()[0] for row in table[2:4]] == ["0", "1"]


def test_the_libraries_output_is_in_the_log_file(info_run):
    exp, console = info_run
    assert sorted(p.name for p in (exp / "logs").iterdir()) == ["rank0.log"]
    log = (exp / "logs" / "rank0.log").read_text()
    missing = [n for n in CHATTER if n not in log]
    assert not missing, f"{missing} not in rank0.log:\n{log[:3000]}"
    assert "iteration 1: done in" in log and "run summary" in log        # the run's own lines too


def test_debug_shows_the_libraries_on_the_console(tmp_path, info_run):
    """The same chatter, found in the INFO run's log file, is on the console at DEBUG (the independent
    check that the log file received what the console would otherwise have shown)."""
    console = _train(tmp_path / "run", "optune.iterations=1", "eval.num_prompts=0", "logging.level=DEBUG")
    text = "\n".join(console)
    log = (info_run[0] / "logs" / "rank0.log").read_text()
    assert [n for n in CHATTER if n in text] == [n for n in CHATTER if n in log] == CHATTER, text[-3000:]
    assert "chunk 0 of 1 generated" in text                             # the project's DEBUG lines too


@pytest.mark.multiproc
def test_second_data_parallel_rank_prints_nothing(tmp_path):
    exp, port = tmp_path / "run", str(_free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "optune_nemo.train", f"exp_dir={exp}", *RUN, "optune.iterations=1",
             "eval.num_prompts=0"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert outputs[1] == "", outputs[1]
    assert "[rank0] iteration 0: done in" in outputs[0], outputs[0]
    assert not [line for line in outputs[0].splitlines() if any(n in line for n in NEVER)], outputs[0]
    assert "Apex is not installed" in (exp / "logs" / "rank1.log").read_text()   # kept, not printed


_SCRIPT = """
import logging, sys, warnings
from optune_nemo.runtime.console import hold_early_records, log_to, setup_logging
hold_early_records()
warnings.warn("early import notice", UserWarning)
logging.getLogger("optune_nemo.x").info("early own line")
logging.getLogger("optune_nemo.x").warning("early own warning")
rank, run_log = int(sys.argv[1]), sys.argv[2] == "1"
setup_logging(rank, "INFO", run_log=run_log)
logging.getLogger("megatron.core").info("library config dump")
logging.getLogger("pytriton").warning("library warning")
logging.getLogger("torch").error("library error")
warnings.warn("late notice", FutureWarning)
logging.getLogger("optune_nemo.x").info("own line")
logging.getLogger("optune_nemo.x").warning("own warning")
if run_log:
    log_to(sys.argv[3])
"""


@pytest.mark.parametrize("rank,run_log,shown", [
    (0, True, ["early own warning", "early own line", "library error", "own line", "own warning"]),
    (1, True, ["early own warning", "library error", "own warning"]),
    # the reward server and the sweep driver: no log file, so other libraries' warnings stay on the console
    (0, False, ["early own warning", "early own line", "library warning", "library error", "own line",
                "own warning"]),
])
def test_console_filter_by_rank_and_log_file(tmp_path, rank, run_log, shown):
    """Which records reach the console, and that the log file gets every one of them, the ones held from
    before the set-up (an import's warning) included."""
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(rank), str(int(run_log)), str(tmp_path / "logs")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert [next(s for s in shown if line.endswith(s)) for line in lines] == shown, lines
    if run_log:
        log = (tmp_path / "logs" / f"rank{rank}.log").read_text()
        for needle in ("early import notice", "early own line", "library config dump", "library warning",
                       "late notice", "own line"):
            assert needle in log, log
