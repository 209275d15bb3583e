"""Every script a user is told to run (bench/, experiments/, scripts/) runs here as a subprocess with tiny
settings: its default mode first, then its documented flags (a flag too costly for a smoke run is parsed
instead, and the comment says why). Results go to tmp paths, never into docs/data. The last tests fail when a
script there has no smoke test, and when a function-local import shadows a module-level name (the
UnboundLocalError that broke bench/generation.py's default mode: nothing ran the scripts)."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT_DIRS = ("bench", "experiments", "scripts")
# the tiny random model (byte tokenizer), a handful of prompts and tokens; no TensorBoard (its import costs
# ~2 CPU seconds a run, and other tests cover it)
TINY_RUN = ["policy.hf_path=null", "precision=fp32", "data.num_prompts=4", "eval.num_prompts=2",
            "eval.max_new_tokens=4", "generation.max_new_tokens=4", "train.global_batch_size=4",
            "train.micro_batch_size=2", "logging.progress=false", "logging.tensorboard=false"]
SHARED = ("policy.hf_path", "precision", "logging.")     # keys train_rm has too

def _run(*argv: str, env: dict | None = None, timeout: int = 600, python: bool = False) -> subprocess.CompletedProcess:
    """A script as a user runs it: from the repository root, `.py` (or, `python`, any arguments) with this
    Python, `.sh` with bash."""
    cmd = [sys.executable if python or argv[0].endswith(".py") else "bash", *argv]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _refused(proc: subprocess.CompletedProcess, prefix: str) -> str:
    """Bad input: exit 2, no traceback, the last stderr line names the problem."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines and lines[-1].startswith(prefix), lines[-1:]
    return lines[-1]


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _module(path: str):
    spec = importlib.util.spec_from_file_location("user_script_" + Path(path).stem, ROOT / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from hf_tiny import save_hf_model_with_tokenizer

    return save_hf_model_with_tokenizer("llama_untied", tmp_path_factory.mktemp("hf") / "llama", seed=3)


# --------------------------------------------------------------------------- bench/generation.py


@pytest.mark.slow
def test_generation_default_mode(tiny_hf, tmp_path):
    """Default dtypes (float32 and bfloat16) and the profiled pass; only the sizes are tiny."""
    out = tmp_path / "gen.json"
    _ok(_run("bench/generation.py", "--hf-path", str(tiny_hf), "--prompts", "2", "--max-new-tokens", "4",
             "--reps", "1", "--seq-length", "64", "--out", str(out)))
    rows = json.loads(out.read_text())
    assert [(r["dtype"], r["prompts"]) for r in rows] == [("float32", 2), ("bfloat16", 2)]
    for r in rows:
        assert r["n"] == 2 and r["reps"] == 1 and not r["compiled"]
        # every sample ends at its stop token or after max_new_tokens: at most 2 prompts x 2 samples x 4
        assert 0 < r["engine_tokens"][0] <= 16 and 0 < r["hf_tokens"][0] <= 16
        assert 0 < r["matmul_share"] < 1 and r["profiled"] == "cpu ops"
    # greedy decoding equals transformers' generate token for token (bf16 rounding may flip a near-tie)
    assert rows[0]["greedy_equal"] == "2/2"


@pytest.mark.slow
def test_generation_flags(tiny_hf):
    """--compile with the `eager` backend: dynamo traces the same two functions the inductor run compiles
    (inductor's C++ kernel builds take about a minute on a 2-core CPU, too slow for a smoke run)."""
    proc = _ok(_run("bench/generation.py", "--hf-path", str(tiny_hf), "--prompts", "1", "3", "--n", "1",
                    "--seed", "3", "--max-new-tokens", "3", "--dtype", "bfloat16", "--reps", "2",
                    "--seq-length", "48", "--no-profile", "--compile", "--compile-backend", "eager"))
    rows = [r for r in _json_lines(proc.stdout) if r.get("benchmark") == "generation"]
    assert [(r["dtype"], r["prompts"]) for r in rows] == [("bfloat16", 1), ("bfloat16", 3)]
    for r in rows:
        assert r["compiled"] and r["n"] == 1 and len(r["engine_s"]) == 2 and "matmul_share" not in r
        assert all(0 < t <= r["prompts"] * 3 for t in r["engine_tokens"] + r["hf_tokens"])


@pytest.mark.slow
def test_generation_gpu_comparison_flags(tiny_hf):
    """The GPU comparison's flags on the CPU: the static-cache decode (graphs need CUDA), transformers with
    its static cache, and the weights-streaming floor (the weight bytes: what transformers' model holds)."""
    proc = _ok(_run("bench/generation.py", "--hf-path", str(tiny_hf), "--prompts", "2", "--max-new-tokens", "3",
                    "--dtype", "float32", "--reps", "1", "--seq-length", "48", "--no-profile",
                    "--decode-mode", "static", "--hf-static", "--weights-streaming"))
    (r,) = [r for r in _json_lines(proc.stdout) if r.get("benchmark") == "generation"]
    assert r["decode_mode"] == "static" and r["greedy_equal"] == "2/2"
    assert r["hf_static_tokens_per_s"] > 0 and r["ratio_vs_static"] > 0
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_hf)
    assert r["weight_bytes"] == 4 * sum(p.numel() for p in hf.parameters())          # float32
    assert r["weights_stream_s"] > 0 and r["step_over_stream"] > 0


@pytest.mark.slow
def test_generation_shape(tiny_hf, tmp_path):
    """--shape: a Llama of the named shape with random weights and the --hf-path model's tokenizer, written once
    and reused; the engine and transformers run it like any model (greedy outputs equal)."""
    shape_dir = tmp_path / "shape"
    argv = ["bench/generation.py", "--hf-path", str(tiny_hf), "--shape", "tiny", "--shape-dir", str(shape_dir),
            "--prompts", "2", "--max-new-tokens", "3", "--dtype", "float32", "--reps", "1", "--seq-length", "96",
            "--no-profile"]
    (r,) = [r for r in _json_lines(_ok(_run(*argv)).stdout) if r.get("benchmark") == "generation"]
    assert r["shape"] == "tiny" and r["model"] == str(shape_dir) and r["greedy_equal"] == "2/2"
    config = json.loads((shape_dir / "config.json").read_text())
    from transformers import AutoTokenizer

    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (2, 64, 2)
    assert config["vocab_size"] == len(AutoTokenizer.from_pretrained(tiny_hf)) and config["tie_word_embeddings"]
    stamp = (shape_dir / "config.json").stat().st_mtime_ns
    _ok(_run(*argv))
    assert (shape_dir / "config.json").stat().st_mtime_ns == stamp                 # reused, not rewritten


# --------------------------------------------------------------------------- bench/iteration.py


@pytest.fixture(scope="module")
def iteration_run(tiny_hf, tmp_path_factory):
    """bench/iteration.py in its default mode (3 iterations after iteration 0, rho 0.5) on the tiny HF model."""
    out = tmp_path_factory.mktemp("iteration")
    overrides = [*TINY_RUN, f"policy.hf_path={tiny_hf}", "model.seq_length=96"]
    proc = _ok(_run("bench/iteration.py", "--out", str(out), "--", *overrides))
    return out, overrides, json.loads(proc.stdout.strip().splitlines()[-1])


def _phase_medians(exp_dir: Path) -> dict:
    records = [json.loads(x) for x in (exp_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if r["iteration"] >= 1]
    return {"iterations": len(records), "total_s": statistics.median(r["time_total_s"] for r in records),
            "generation_s": statistics.median(r["time_generation_s"] for r in records),
            "regenerated": statistics.median(r["regenerated"] for r in records)}


@pytest.mark.slow
def test_iteration_default_mode(iteration_run):
    out, _, result = iteration_run
    assert json.loads((out / "iteration.json").read_text()) == result
    full, part = _phase_medians(out / "rho_1.0"), _phase_medians(out / "rho_0.5")
    assert full["iterations"] == part["iterations"] == result["iterations"] == 3
    assert (full["regenerated"], part["regenerated"]) == (4, 2)        # every prompt, then rho * 4
    assert result["rho_1"]["total_s"] == pytest.approx(full["total_s"])
    g = full["generation_s"] / full["total_s"]
    assert result["generation_share_rho_1"] == pytest.approx(g, abs=1e-4)
    assert result["amdahl_bound"] == pytest.approx(1 / (1 - g + g * 0.5), abs=1e-3)
    assert result["speedup"] == pytest.approx(full["total_s"] / part["total_s"], abs=1e-3)


@pytest.mark.slow
def test_iteration_flags_reuse_the_completed_runs(iteration_run):
    """--rho and --iterations: a second setting next to the first forks from the same iteration 0; the base and
    the rho = 1 run (complete) are not run again."""
    out, overrides, _ = iteration_run
    stamps = {d: (out / d / "COMPLETED").stat().st_mtime_ns for d in ("base", "rho_1.0")}
    proc = _ok(_run("bench/iteration.py", "--out", str(out), "--iterations", "3", "--rho", "0.25", "--",
                    *overrides))
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {d: (out / d / "COMPLETED").stat().st_mtime_ns for d in stamps} == stamps
    assert result["rho"] == 0.25 and _phase_medians(out / "rho_0.25")["regenerated"] == 1
    fork = json.loads((out / "rho_0.25" / "fork.json").read_text())
    assert Path(fork["init_from"]) == (out / "base" / "checkpoints" / "iter_000000").resolve()


@pytest.mark.slow
def test_iteration_num_samples(iteration_run):
    """--num-samples 3: rho = 1 and rho = 0.5 forks with three samples per regenerated prompt from the same
    iteration 0, their generated tokens and reward calls against the n = 2 runs' (read from metrics.jsonl)."""
    out, overrides, _ = iteration_run
    proc = _ok(_run("bench/iteration.py", "--out", str(out), "--num-samples", "3", "--", *overrides))
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for rho, regenerated in (("1.0", 4), ("0.5", 2)):
        records = [json.loads(x) for x in (out / f"rho_{rho}-n3" / "metrics.jsonl").read_text().splitlines()]
        records = [r for r in records if r["iteration"] >= 1]
        assert {(r["num_samples"], r["regenerated"], r["reward_calls"]) for r in records} == {
            (3, regenerated, 3 * regenerated)}
        n2 = [json.loads(x) for x in (out / f"rho_{rho}" / "metrics.jsonl").read_text().splitlines()][1:]
        got = result["n3"][f"rho_{rho}"]
        assert got["reward_calls"] == 3 * regenerated
        assert got["over_n2"]["reward_calls"] == pytest.approx(1.5)
        assert got["over_n2"]["generated_tokens"] == pytest.approx(
            statistics.median(r["generated_tokens"] for r in records)
            / statistics.median(r["generated_tokens"] for r in n2), abs=1e-4)
    assert _run("bench/iteration.py", "--out", str(out), "--num-samples", "1").returncode == 2


# --------------------------------------------------------------------------- bench/training.py


def test_training_default_mode():
    """The default preset (tiny), precision and lengths; fewer steps and pairs."""
    proc = _ok(_run("bench/training.py", "--steps", "2", "--pairs-per-step", "4"))
    r = _json_lines(proc.stdout)[-1]
    # the tiny preset's parameters by hand: the tied embedding (vocab 300 padded to 384) x 64, per layer
    # QKV 64 x (64 + 2 x 2 x 16), the output projection 64 x 64, SwiGLU 64 x 2 x 176 + 176 x 64, two norms of
    # 64; the final norm
    assert r["params"] == 384 * 64 + 2 * (64 * 128 + 64 * 64 + 64 * 352 + 176 * 64 + 2 * 64) + 64
    assert (r["preset"], r["precision"], r["prompt_tokens"], r["response_tokens"]) == ("tiny", "fp32", 32, 32)
    assert len(r["step_s"]) == 2 and r["median_step_s"] == pytest.approx(statistics.median(r["step_s"]), abs=1e-3)
    assert r["tokens_per_s"] == pytest.approx(4 * (32 + 2 * 32) / r["median_step_s"], rel=1e-2)


def test_training_flags():
    proc = _ok(_run("bench/training.py", "--preset", "tiny", "--precision", "bf16", "--attention", "sdpa",
                    "--transformer-impl", "local", "--profile", "--steps", "1", "--warmup", "0",
                    "--pairs-per-step", "2", "--micro-batch-size", "1", "--micro-batch-tokens", "24",
                    "--prompt-tokens", "5", "--response-tokens", "3", "--peak-tflops", "2.5"))
    r = _json_lines(proc.stdout)[-1]
    assert (r["precision"], r["pairs_per_step"], r["micro_batch_size"]) == ("bf16", 2, 1)
    assert r["micro_batch_tokens"] == 24              # 2 pairs of 5 + 3 + 3 tokens: one row of 22
    assert (r["prompt_tokens"], r["response_tokens"], r["peak_tflops"], len(r["step_s"])) == (5, 3, 2.5, 1)
    assert (r["attention_backend"], r["transformer_impl"]) == ("sdpa", "local")
    assert r["profile_top"] and all(e["calls"] > 0 and e["self_ms"] >= 0 for e in r["profile_top"])


def test_training_refusals(capsys):
    """In this process (the script's `__main__` only calls main): the checks run before any model is built."""
    training = _module("bench/training.py")
    with pytest.raises(SystemExit) as e:
        training.main(["--prompt-tokens", "100", "--response-tokens", "100"])
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("bench/training.py: --prompt-tokens 100 + --response-tokens 100"), lines
    for flags, key in ((["--micro-batch-tokens", "-5"], "train.micro_batch_tokens: must be >= 0"),
                       (["--micro-batch-size", "0"], "train.micro_batch_size: must be > 0"),
                       (["--pairs-per-step", "6"], "train.global_batch_size: must be a multiple")):
        with pytest.raises(SystemExit) as e:
            training.main(flags)
        assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].startswith(
            f"bench/training.py: {key}"), flags
    import torch

    if not torch.cuda.is_available():          # --precision fp8 needs a GPU with Transformer Engine
        with pytest.raises(SystemExit) as e:
            training.main(["--precision", "fp8"])
        assert e.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("bench/training.py: --precision fp8")


def test_training_presets_and_flop_formula():
    """The llama-1b (1.2 B parameters, ~20 GB with Adam state) and smollm2 presets (135 M; one bf16 step takes
    ~20 s on a 2-core CPU) are too large for a smoke run: their overrides pass the run's own checks here, and
    bench/gpu_session.sh's commands with them parse (test_gpu_session_dry_run). The FLOP count against a
    first-principles count of the tiny shape."""
    from optune_nemo.config import load_config
    from optune_nemo.runner import resolve

    training = _module("bench/training.py")
    for name, (shape, _) in training.PRESETS.items():
        cfg = resolve(load_config([*shape, "policy.hf_path=null", "eval.num_prompts=0"]))
        assert cfg.model.seq_length >= 128, name
    m = resolve(load_config([*training.PRESETS["tiny"][0], "policy.hf_path=null"])).model
    # per token forward: 2 FLOPs per weight of Q (64x64), K and V (64x32 each), O (64x64) and the SwiGLU
    # (3 x 64x176); causal attention QK^T and AV over `s` positions at half: 2 x 2 x s x 64 / 2. Backward
    # doubles it (x 3 in all); the LM head 2 x 64 x vocab per head token, x 3
    per_layer = lambda s: 3 * (2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 176) + 2 * s * 64)
    for s in (1, 40, 128):
        got = training.megatron_flops(m, tokens=1, attended=s, head_tokens=1, vocab=300)
        assert got == pytest.approx(2 * per_layer(s) + 3 * 2 * 64 * 300)


# --------------------------------------------------------------------------- bench/vs_trl.py

HAVE_TRL = importlib.util.find_spec("trl") is not None


def _store_pairs(store: Path) -> list[tuple[int, int, int]]:
    """(prompt, response a, response b) lengths of the store's non-tied pairs, read from the parquet file."""
    d = pq.read_table(store).to_pydict()
    return [(len(p), len(a), len(b)) for p, a, b, ra, rb in zip(
        d["prompt_token_ids"], d["response_a_token_ids"], d["response_b_token_ids"], d["reward_a"], d["reward_b"])
        if ra != rb]


@pytest.mark.skipif(HAVE_TRL, reason="TRL is installed here: the missing-TRL message cannot be seen")
def test_vs_trl_without_trl_says_what_to_install(tmp_path):
    """The default mode needs TRL (its own venv); the suite's venv has none: one line, exit 2, before anything
    else (the store is not even read). The same through bench/training.py --vs-trl."""
    store = tmp_path / "rollouts.parquet"
    for argv in (["bench/vs_trl.py"], ["bench/training.py", "--vs-trl"]):
        last = _refused(_run(*argv, "--store", str(store)), "bench/vs_trl.py: TRL is not installed")
        assert "--skip-trl" in last and ".[trl]" in last


@pytest.mark.slow
def test_vs_trl_our_side_and_flags(iteration_run, tiny_hf, tmp_path):
    """Every flag but the TRL side's own work: --skip-trl times this project's reference + train phases."""
    store = iteration_run[0] / "base" / "checkpoints" / "iter_000000" / "rollouts.parquet"
    expected = _store_pairs(store)[:2]
    assert expected, "the tiny run's store has no non-tied pair"
    out = tmp_path / "vs_trl.jsonl"
    proc = _ok(_run("bench/vs_trl.py", "--store", str(store), "--hf-path", str(tiny_hf), "--precision", "fp32",
                    "--batch", "2", "--micro-batch", "1", "--lr", "1e-4", "--pairs", "2", "--reps", "1",
                    "--seq-length", "96", "--trl-output", str(tmp_path / "trl"), "--out", str(out), "--skip-trl"))
    r = _json_lines(proc.stdout)[-1]
    assert _json_lines(out.read_text()) == [r]
    assert r["pairs"] == len(expected) and r["tokens_ours"] == sum(2 * p + a + b for p, a, b in expected)
    assert len(r["ours_s"]) == 1 and r["trl_s"] == [] and r["trl_median_s"] is None
    assert not (tmp_path / "trl").exists()
    _refused(_run("bench/vs_trl.py", "--store", str(store), "--batch", "3", "--micro-batch", "2", "--skip-trl"),
             "bench/vs_trl.py: --batch 3 must be a positive multiple of --micro-batch 2")
    _refused(_run("bench/vs_trl.py", "--store", str(tmp_path / "none.parquet"), "--skip-trl"),
             f"bench/vs_trl.py: --store {tmp_path / 'none.parquet'}: no such file")


# --------------------------------------------------------------------------- bench/gpu_session.sh


def test_gpu_session_dry_run(tmp_path):
    """It needs a GPU; DRY_RUN=1 prints each step's command and runs, installs and writes nothing: every
    command names a file that exists and parses with its script's own command line."""
    script = "bench/gpu_session.sh"
    _ok(subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True))
    steps = {}
    for stage in ("all", "tests", "model"):
        proc = _ok(_run(script, env={"DRY_RUN": "1", "OUT": str(tmp_path / "out"), "STAGE": stage}))
        steps[stage] = [line.split() for line in proc.stdout.splitlines()]
    assert not (tmp_path / "out").exists()
    names = lambda stage: [s[0] for s in steps[stage]]
    assert names("all") == ["gpu-tests", "train-llama1b-local", "train-llama1b", "train-smollm2", "generation",
                            "generation-llama1b", "iteration"]
    assert names("tests") == names("all")[:4] and names("model") == names("all")[4:]
    parsers = {}
    for name, limit, py, *argv in steps["all"]:
        assert int(limit) > 0 and py == "python3"
        if argv[:2] == ["-m", "pytest"]:
            assert all((ROOT / a).is_file() for a in argv if a.startswith("tests/")), argv
            continue
        path, *rest = argv
        parsers.setdefault(path, _module(path).parser())
        args = parsers[path].parse_args(rest)              # argparse exits 2 on a flag it does not know
        assert args is not None, name


# --------------------------------------------------------------------------- experiments/


@pytest.mark.slow
def test_gold_proxy_tiny(tmp_path):
    root = tmp_path / "gp"
    train = [a for a in TINY_RUN if not a.startswith(SHARED)]
    proc = _ok(_run("experiments/gold_proxy.py", "--root", str(root), "--prompts", "16", "--rm-epochs", "1",
                    "--seed", "7", "--train-overrides", *train, "optune.iterations=2", "policy.export_hf_final=false",
                    "--rm-overrides", "rm.global_batch_size=4", "rm.micro_batch_size=2",
                    "--", *[a for a in TINY_RUN if a.startswith(SHARED)]))
    result = json.loads((root / "gold_proxy.json").read_text())
    assert _json_lines(proc.stdout)[-1] == result
    sample = pq.read_table(root / "sample" / "checkpoints" / "iter_000000" / "rollouts.parquet").to_pydict()
    assert len(sample["prompt"]) == 16                                       # --prompts, not data.num_prompts
    non_tied = sum(a != b for a, b in zip(sample["reward_a"], sample["reward_b"]))
    assert (result["pairs"], result["ties_dropped"]) == (non_tied, 16 - non_tied)
    assert len((root / "prefs.jsonl").read_text().splitlines()) == non_tied
    assert (root / "rm" / "COMPLETED").is_file()
    assert "rm.epochs=1" in proc.stdout and "seed=7" in proc.stdout
    evals = json.loads((root / "optune" / "eval.json").read_text())
    assert result["gold_heldout_before"] == evals["baseline"]["reward_mean"]
    assert result["iterations"] == 2 and evals["baseline"]["num_prompts"] == 2
    config = (root / "optune" / "config.yaml").read_text()
    assert "type: megatron" in config and str(root / "rm") in config


@pytest.mark.slow
def test_small_scale_tiny(tmp_path):
    """The whole experiment's structure (shared iteration 0 per loss, forks, the no-training control, random
    selection, the DPO fork, pruning, the report) with one seed, two iterations, rho = 1 (lowest_reward's
    own rho < 1 forks run the same lines as rho = 1: left out to save a run), random selection at 0.5 and
    three samples per regenerated prompt at rho = 1. fp32: the no-training control's fork loads an optimizer
    that never stepped (it once failed there)."""
    root = tmp_path / "ss"
    env = {"SEEDS": "1", "ITERATIONS": "2", "RHOS": "1.0", "RANDOM_RHOS": "0.5", "GAP_RHOS": "0.5",
           "SAMPLES_RHOS": "1.0", "NUM_SAMPLES": "3", "OPTUNE_PYTHON": sys.executable}
    _ok(_run("experiments/small_scale.sh", str(root), "--", *TINY_RUN, env=env))
    report = json.loads((root / "report" / "report.json").read_text())
    got = {(s["rho"], s["selection"], s["loss"], s["trained"], s["num_samples"]) for s in report["settings"]}
    assert got == {(1.0, "all", "wdpo", True, 2), (0.5, "random", "wdpo", True, 2),
                   (0.5, "lowest_reward", "dpo", True, 2), (0.5, "smallest_gap", "wdpo", True, 2),
                   (1.0, "all", "wdpo", False, 2), (1.0, "all", "wdpo", True, 3)}, got
    runs = sorted((root / "runs").iterdir())
    assert len(runs) == 6 and all((r / "COMPLETED").is_file() for r in runs)
    for run in runs:
        base = "notrain-seed1" if "notrain" in run.name else "wdpo-seed1"
        fork = json.loads((run / "fork.json").read_text())
        assert Path(fork["init_from"]) == (root / "base" / base / "checkpoints" / "iter_000000").resolve(), run
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in records] == [0, 1], run
        assert not list((run / "checkpoints").glob("iter_*/model")), f"{run} was not pruned"
    assert "loss:\n  name: dpo" in (root / "runs" / "rho0.5-lowest_reward-dpo-seed1" / "config.yaml").read_text()
    assert (root / "report" / "report.md").is_file()
    _archive_reads_as_the_original(root, tmp_path)


def _archive_reads_as_the_original(root: Path, tmp_path: Path):
    """scripts/archive_runs.py on the finished experiment, moved elsewhere: the report of the archive has the
    same numbers as the report of the original runs (only paths differ), without a single model shard."""
    dest = tmp_path / "elsewhere" / "archive"
    line = json.loads(_ok(_run("scripts/archive_runs.py", str(root), str(dest))).stdout.strip())
    assert line["archived"] == 8 and line["unfinished"] == [] and line["bytes"] > 0     # 2 bases + 6 runs
    assert not [p for p in dest.rglob("*") if p.name in ("model", "optimizer") or p.suffix == ".distcp"]
    assert not list(dest.glob("runs/rho0.5-random-*/checkpoints"))        # stores only where Fig. 2 reads them
    moved = tmp_path / "moved"
    shutil.move(str(dest), moved)
    _ok(_run("-m", "optune_nemo.report", str(moved / "runs"), "--out", str(tmp_path / "archived_report"),
             python=True))
    # the same report but for where the runs lie (Fig. 2's rows and the runs list name their directories)
    same = lambda path, where: json.loads(path.read_text().replace(str(where.resolve()), "ROOT")
                                          .replace(str(where), "ROOT"))
    original = same(root / "report" / "report.json", root)
    archived = same(tmp_path / "archived_report" / "report.json", moved)
    for run in archived["runs"]:                # the archive's fork.json is relative: ROOT/runs/x/../../base/y
        run["forked_from"] = run["forked_from"] and os.path.normpath(run["forked_from"])
    drop = lambda rep: {k: v for k, v in rep.items() if k != "figures"}
    assert drop(archived) == drop(original)
    assert _run("scripts/archive_runs.py", str(tmp_path / "nothing"), str(tmp_path / "x")).returncode == 2


def _fake_python(tmp_path: Path) -> Path:
    """A stand-in for OPTUNE_PYTHON that appends its argument list (one JSON line) to calls.jsonl and succeeds:
    it shows what a driver script would run, in what order, without running it."""
    fake = tmp_path / "fake_python"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(tmp_path / 'calls.jsonl')!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    fake.chmod(0o755)
    return fake


def _calls(tmp_path: Path) -> list[list[str]]:
    return [json.loads(x) for x in (tmp_path / "calls.jsonl").read_text().splitlines()]


def _flag(argv: list[str], flag: str) -> list[str]:
    """The values after `flag` up to the next flag or `--`."""
    i = argv.index(flag) + 1
    out = []
    while i < len(argv) and not argv[i].startswith("--"):
        out.append(argv[i])
        i += 1
    return out


def test_decisive_runs_the_claims_settings_seed_by_seed(tmp_path):
    """experiments/decisive.sh drives small_scale.sh: for each seed in turn the lowest_reward sweep (rho 0.3,
    0.5, 1 and the control), random, smallest_gap and oldest at 0.5, the DPO fork from the seed's wDPO
    iteration 0, the n = 4 forks at 0.5 and 1 (seeds 1-5 only: 4 has them, 7 not); the report last. The
    recipe's overrides and the user's reach every run. (The runs themselves are the same lines as
    test_small_scale_tiny's.)"""
    env = {"OPTUNE_PYTHON": str(_fake_python(tmp_path)), "SEEDS": "4 7", "ARCHIVE": str(tmp_path / "keep")}
    _ok(_run("experiments/decisive.sh", str(tmp_path / "d"), "--", "data.num_prompts=8", env=env))
    calls = _calls(tmp_path)
    sweeps = [c for c in calls if c[:2] == ["-m", "optune_nemo.sweep"]]
    flags = lambda c: (_flag(c, "--seeds"), _flag(c, "--rho"), _flag(c, "--selection"), "--control" in c,
                       _flag(c, "--num-samples") if "--num-samples" in c else None)
    assert [flags(c) for c in sweeps] == [
        (["4"], ["0.3", "0.5", "1.0"], ["lowest_reward"], True, None), (["4"], ["0.5"], ["random"], False, None),
        (["4"], ["0.5"], ["smallest_gap"], False, None), (["4"], ["0.5"], ["oldest"], False, None),
        (["4"], ["0.5", "1.0"], ["lowest_reward"], False, ["4"]),
        (["7"], ["0.3", "0.5", "1.0"], ["lowest_reward"], True, None), (["7"], ["0.5"], ["random"], False, None),
        (["7"], ["0.5"], ["smallest_gap"], False, None), (["7"], ["0.5"], ["oldest"], False, None)]
    for c in sweeps:
        assert _flag(c, "--iterations") == ["6"] and "--prune" in c
        assert c[-2:] == ["eval.num_prompts=256", "data.num_prompts=8"], c
    trains = [c for c in calls if c[:2] == ["-m", "optune_nemo.train"]]
    assert [next(a for a in c if a.startswith("seed=")) for c in trains] == ["seed=4", "seed=7"]
    assert all("loss.name=dpo" in c and "optune.iterations=6" in c and "data.num_prompts=8" in c for c in trains)
    order = [c[1] if c[0] == "-m" else "prune" if c[0] == "-c" else c[0] for c in calls]
    seed4 = ["optune_nemo.sweep"] * 4 + ["optune_nemo.train", "prune", "optune_nemo.sweep", "scripts/archive_runs.py"]
    seed7 = [x for i, x in enumerate(seed4) if i != 6]                    # no n = 4 sweep
    assert order == seed4 + seed7 + ["optune_nemo.report"]
    assert all(c[1:] == [str(tmp_path / "d"), str(tmp_path / "keep")] for c in calls if c[0].endswith(".py"))
    for key, value in (("SAMPLES_SEEDS", "1,2"), ("SEEDS", "1 x")):
        bad = _run("experiments/decisive.sh", str(tmp_path / "bad"), env={**env, key: value})
        assert bad.returncode == 2 and bad.stderr.strip().startswith(f"small_scale.sh: {key}: "), bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_gpu_experiment_plumbing(tmp_path):
    """experiments/gpu_experiment.sh needs a GPU: its dry run fits 10 minutes and names existing scripts whose
    command lines parse; with a stand-in Python (nothing runs) each seed gets its own small_scale.sh with the
    decisive settings, the report comes after them, and the timing calls follow at 256 and 512 tokens."""
    script = "experiments/gpu_experiment.sh"
    proc = _ok(_run(script, env={"DRY_RUN": "1", "OUT": str(tmp_path / "dry")}))
    steps = [line.split() for line in proc.stdout.splitlines()]
    assert not (tmp_path / "dry").exists()
    assert [s[0] for s in steps] == ["quality", "quality-report", "timing-256-rho0.5", "timing-256-rho0.7",
                                     "timing-512-rho0.5", "timing-512-rho0.7"]
    assert sum(int(s[1]) for s in steps) <= 600
    iteration = _module("bench/iteration.py").parser()
    for s in steps[2:]:
        assert s[3] == "bench/iteration.py"
        assert iteration.parse_args(s[4:]) is not None          # argparse exits 2 on a flag it does not know
    env = {"OPTUNE_PYTHON": str(_fake_python(tmp_path)), "SEEDS": "3 5", "PARALLEL": "2", "OUT": str(tmp_path / "o")}
    _ok(_run(script, env=env))
    calls = _calls(tmp_path)
    sweeps = [c for c in calls if c[:2] == ["-m", "optune_nemo.sweep"]]
    assert sorted((_flag(c, "--seeds")[0], tuple(_flag(c, "--selection"))) for c in sweeps) == sorted(
        (s, sel) for s in ("3", "5") for sel in (("lowest_reward",), ("random",), ("smallest_gap",), ("oldest",)))
    assert all(str(tmp_path / "o" / "quality") == _flag(c, "--root")[0] for c in sweeps)
    assert all("policy.hf_path=smollm2" in c and "eval.num_prompts=256" in c for c in sweeps)
    rest = [c for c in calls if c not in sweeps and c[:2] != ["-m", "optune_nemo.train"] and c[0] != "-c"]
    assert rest[0][:2] == ["-m", "optune_nemo.report"] and calls.index(rest[0]) > max(map(calls.index, sweeps))
    assert [(c[0], c[c.index("--rho") + 1], next(a for a in c if a.startswith("generation.max_new_tokens")))
            for c in rest[1:]] == [("bench/iteration.py", r, f"generation.max_new_tokens={n}")
                                   for n in (256, 512) for r in ("0.5", "0.7")]


@pytest.mark.slow
def test_pilot_tiny(tmp_path):
    """experiments/pilot.sh with one recipe and one seed, for real on the tiny model: the recipe's overrides
    reach the runs' config, the first recipe's first seed gets the no-training control, and the report is
    written; an unknown recipe is refused before anything runs."""
    root = tmp_path / "pilot"
    env = {"SEEDS": "1", "ITERATIONS": "2", "RECIPES": "r1", "OPTUNE_PYTHON": sys.executable}
    _ok(_run("experiments/pilot.sh", str(root), "--", *TINY_RUN, env=env))
    runs = sorted(p.name for p in (root / "r1" / "runs").iterdir())
    assert runs == ["rho1-all-notrain-seed1", "rho1-all-wdpo-seed1"]
    config = (root / "r1" / "runs" / "rho1-all-wdpo-seed1" / "config.yaml").read_text()
    assert "epochs_per_iteration: 2" in config and "lr: 3.0e-05" in config
    assert (root / "r1" / "report" / "report.json").is_file()
    bad = _run("experiments/pilot.sh", str(tmp_path / "bad"), env={**env, "RECIPES": "r9"})
    assert bad.returncode == 2 and bad.stderr.strip().startswith("pilot.sh: RECIPES: unknown recipe 'r9'")
    assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------- scripts/


def test_record_run(iteration_run, tmp_path):
    run = iteration_run[0] / "base"
    out = tmp_path / "recorded"
    _ok(_run("scripts/record_run.py", str(run), str(out), "--wall-s", "12.34", "--command", "make run"))
    for name in ("metrics.jsonl", "eval.json", "config.yaml"):
        if (run / name).is_file():
            assert (out / name).read_bytes() == (run / name).read_bytes(), name
    assert (out / "metrics.jsonl").is_file() and (out / "config.yaml").is_file()
    meta = json.loads((out / "run.json").read_text())
    assert (meta["command"], meta["wall_s"], meta["device"]) == ("make run", 12.3, "cpu")
    _refused(_run("scripts/record_run.py", str(tmp_path), str(tmp_path / "x"), "--wall-s", "1", "--command", "c"),
             f"record_run: {tmp_path}: not a completed run")
    assert not (tmp_path / "x").exists()


def test_render_docs_on_a_copy(tmp_path):
    """Its default mode rewrites the documents in place: here on a copy (--root), never this checkout's."""
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    for path in (ROOT / "docs").glob("*.md"):
        shutil.copy(path, tmp_path / "docs" / path.name)
    for name in ("data", "results"):
        shutil.copytree(ROOT / "docs" / name, tmp_path / "docs" / name)
    readme = (ROOT / "README.md").read_text()
    begin = "<!-- BEGIN generated:default-run (scripts/render_docs.py) -->\n"
    start, end = readme.index(begin) + len(begin), readme.index("<!-- END generated:default-run -->")
    (tmp_path / "README.md").write_text(readme[:start] + "stale\n" + readme[end:])
    last = _run("scripts/render_docs.py", "--root", str(tmp_path), "--check")
    assert last.returncode == 1 and "stale generated blocks in README.md" in last.stderr, last.stderr
    _ok(_run("scripts/render_docs.py", "--root", str(tmp_path)))
    assert (tmp_path / "README.md").read_text() == readme
    _ok(_run("scripts/render_docs.py", "--root", str(tmp_path), "--check"))


# --------------------------------------------------------------------------- completeness

SMOKE_TESTS = {
    "bench/generation.py": [test_generation_default_mode, test_generation_flags,
                            test_generation_gpu_comparison_flags, test_generation_shape],
    "bench/iteration.py": [test_iteration_default_mode, test_iteration_flags_reuse_the_completed_runs,
                           test_iteration_num_samples],
    "bench/training.py": [test_training_default_mode, test_training_flags, test_training_refusals,
                          test_training_presets_and_flop_formula],
    "bench/vs_trl.py": [test_vs_trl_without_trl_says_what_to_install, test_vs_trl_our_side_and_flags],
    "bench/gpu_session.sh": [test_gpu_session_dry_run],
    "experiments/gold_proxy.py": [test_gold_proxy_tiny],
    "experiments/small_scale.sh": [test_small_scale_tiny],
    "experiments/decisive.sh": [test_decisive_runs_the_claims_settings_seed_by_seed],
    "experiments/pilot.sh": [test_pilot_tiny],
    "experiments/gpu_experiment.sh": [test_gpu_experiment_plumbing],
    "scripts/record_run.py": [test_record_run],
    "scripts/archive_runs.py": [test_small_scale_tiny],
    "scripts/render_docs.py": [test_render_docs_on_a_copy],
}


def _user_scripts() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for d in SCRIPT_DIRS for p in (ROOT / d).iterdir()
                  if p.is_file() and p.suffix in (".py", ".sh"))


def test_every_user_script_has_a_smoke_test():
    missing = sorted(set(_user_scripts()) - set(SMOKE_TESTS))
    assert not missing, f"scripts without a smoke test in {Path(__file__).name}: {missing}"
    assert set(SMOKE_TESTS) <= set(_user_scripts()), "SMOKE_TESTS names a script that is gone"
    for tests in SMOKE_TESTS.values():
        assert tests and all(globals().get(t.__name__) is t for t in tests)


def _shadowing_imports(path: Path) -> list[str]:
    """Function-local imports binding a name the module binds at its top level: Python makes that name local
    to the whole function, so a use before the import (or on a path without it) raises UnboundLocalError."""
    tree = ast.parse(path.read_text())
    top = {(a.asname or a.name).split(".")[0] for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
           for a in node.names}
    top |= {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    top |= {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
            if isinstance(t, ast.Name)}
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for a in node.names:
                    name = (a.asname or a.name).split(".")[0]
                    if name in top:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} {fn.name}() imports {a.name}")
    return found


def test_no_function_local_import_shadows_a_module_name():
    found = [f for s in _user_scripts() if s.endswith(".py") for f in _shadowing_imports(ROOT / s)]
    assert not found, found
