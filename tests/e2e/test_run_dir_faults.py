"""Faults around one run directory, through the real command line: two runs started at once on one
exp_dir (one refuses in one line, the other ends as a run alone would), and damaged or hostile checkpoint
files (one line naming the file, exit 3, nothing loaded; resume=auto falls back to the previous one)."""

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_optune_loop import E2E, _metrics, _store

from optune_nemo.runtime.checkpoint import write_manifest

ROOT = Path(__file__).resolve().parents[2]
TWO = ["optune.iterations=2"]


def _popen(exp_dir, *overrides, cwd=None):
    return subprocess.Popen([sys.executable, "-m", "optune_nemo.train", *E2E, *TWO, f"exp_dir={exp_dir}", *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd or ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "tests" / "fixtures")})


def _run(exp_dir, *overrides, cwd=None):
    proc = _popen(exp_dir, *overrides, cwd=cwd)
    out, err = proc.communicate(timeout=600)
    lines = [line for line in err.splitlines() if line.strip()]
    return proc.returncode, (lines[-1] if lines else ""), err


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    """A run on its own: iterations 0 and 1, a checkpoint after each."""
    exp = tmp_path_factory.mktemp("alone") / "run"
    rc, _, err = _run(exp)
    assert rc == 0, err[-3000:]
    return exp


def test_two_runs_at_once_on_one_exp_dir(alone, tmp_path):
    exp = tmp_path / "run"
    procs = [_popen(exp), _popen(exp)]
    results = [(p, *p.communicate(timeout=600)) for p in procs]
    codes = sorted(p.returncode for p, _, _ in results)
    assert codes == [0, 2], [err[-2000:] for _, _, err in results]
    (winner, _, _), (loser, _, err) = sorted(results, key=lambda r: r[0].returncode)
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err[-3000:]
    assert lines[-1].startswith(f"optune_nemo: error: exp_dir {exp} is in use by another run"), lines[-1]
    assert f"pid {winner.pid}" in lines[-1]
    assert (exp / "COMPLETED").exists()
    assert _store(exp, 1) == _store(alone, 1)
    assert _metrics(exp) == _metrics(alone)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _plant(path: Path) -> None:
    path.write_bytes(pickle.dumps({"state": _Payload()}))


def _damaged_copy(alone, tmp_path, damage) -> tuple[Path, Path]:
    """A copy of the finished run without its COMPLETED marker, iteration 1's checkpoint damaged; returns
    (exp_dir, the damaged file)."""
    exp = tmp_path / "run"
    shutil.copytree(alone, exp)
    (exp / "COMPLETED").unlink()
    newest = exp / "checkpoints" / "iter_000001"
    if damage == "common.pt":          # megatron's non-tensor state: an object the weights-only loader refuses
        target = newest / "model" / "common.pt"
        _plant(target)
    elif damage == ".metadata":        # torch.distributed.checkpoint's pickle with a foreign global
        target = newest / "model" / ".metadata"
        _plant(target)
    elif damage == "rng_states.pt":
        target = newest / "rng_states.pt"
        _plant(target)
    elif damage == "missing shard":    # a consistent manifest that lists no shard: only the load can tell
        target = sorted((newest / "model").glob("*.distcp"))[0]
        target.unlink()
    else:                              # bytes changed after the checkpoint was written: the manifest tells
        target = sorted((newest / "model").glob("*.distcp"))[0]
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    if damage != "flipped byte":
        write_manifest(newest)
    return exp, target


@pytest.mark.parametrize("damage", ["common.pt", ".metadata", "rng_states.pt", "missing shard", "flipped byte"])
def test_a_named_damaged_checkpoint_is_refused_in_one_line(alone, tmp_path, damage):
    exp, target = _damaged_copy(alone, tmp_path, damage)
    rc, last, err = _run(exp, f"resume={exp / 'checkpoints' / 'iter_000001'}", cwd=tmp_path)
    assert rc == 3, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert last.startswith("optune_nemo: checkpoint error: "), last
    named = target.parent if damage == "missing shard" else target    # the load names the model directory
    assert str(named) in last, last
    assert not (tmp_path / "PWNED").exists()
    assert not (exp / "COMPLETED").exists()


def test_resume_auto_falls_back_past_a_hostile_newest(alone, tmp_path):
    exp, target = _damaged_copy(alone, tmp_path, "common.pt")
    rc, _, err = _run(exp, cwd=tmp_path)
    assert rc == 0, err[-3000:]
    assert "iter_000001 is not usable" in err and str(target) in err
    assert not (tmp_path / "PWNED").exists()
    assert _store(exp, 1) == _store(alone, 1)      # iteration 1 again, from iteration 0: as the run alone
    assert _metrics(exp) == _metrics(alone)


def test_resume_auto_with_no_usable_checkpoint_stops(alone, tmp_path):
    exp, _ = _damaged_copy(alone, tmp_path, "flipped byte")
    first = exp / "checkpoints" / "iter_000000" / "rng_states.pt"
    _plant(first)
    write_manifest(first.parent)
    rc, last, err = _run(exp, cwd=tmp_path)
    assert rc == 3 and "Traceback" not in err, err[-3000:]
    assert last.startswith("optune_nemo: checkpoint error: no usable checkpoint in"), last
    assert [p.name for p in (exp / "checkpoints").iterdir() if p.name.startswith("iter_")] == \
        ["iter_000000", "iter_000001"] or sorted(p.name for p in (exp / "checkpoints").glob("iter_*")) == \
        ["iter_000000", "iter_000001"]
    assert not (exp / "COMPLETED").exists()
