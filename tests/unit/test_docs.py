"""The documentation keeps its promises: every measured figure is what scripts/render_docs.py renders from
the recorded data, and every `optune_nemo.train` command shown in README.md and docs/slurm.md passes the
run's own pre-flight checks (the pretrained model's shape against TP/PP, every key and value) with the
world size the command launches."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from optune_nemo.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", REPO / "docs" / "slurm.md"]

# public config.json shapes of the models the docs name (no weights: the checks read the shape only)
LLAMA_31_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
               "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
               "max_position_embeddings": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
QWEN2_05B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
             "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
             "max_position_embeddings": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16"}


def test_generated_blocks_match_their_data():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "render_docs.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_block_has_its_renderer():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import render_docs
    finally:
        sys.path.pop(0)
    names = [m.group("name") for p in render_docs.documents() for m in render_docs.BLOCK.finditer(p.read_text())]
    assert names and set(names) <= set(render_docs.BLOCKS)
    assert set(render_docs.BLOCKS) <= set(names)          # no renderer without its block


def _commands(path: Path) -> list[str]:
    """Shell commands of the ```bash blocks, continuation lines joined, comments dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.split(" # ")[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


SLURM_DEFAULT_TASKS = int(re.search(r"^#SBATCH --ntasks-per-node=(\d+)$", (REPO / "slurm" / "optune.sh").read_text(),
                                    re.M).group(1))
"""Tasks per node of `sbatch slurm/optune.sh` without --ntasks-per-node: the script's own header."""


def _train_invocations(path: Path) -> list[tuple[str, int, list[str]]]:
    """(command, world size, overrides) of every command that runs optune_nemo.train."""
    found = []
    for cmd in _commands(path):
        words = shlex.split(cmd)
        if "..." in words or "optune_nemo.train" not in words and "slurm/optune.sh" not in words:
            continue
        world = 1
        for i, w in enumerate(words):
            if w == "--nproc-per-node":
                world = int(words[i + 1])
        nodes = next((int(w.split("=")[1]) for w in words if w.startswith("--nodes=")), 1)
        tasks = next((int(w.split("=")[1]) for w in words if w.startswith("--ntasks-per-node=")), None)
        if "slurm/optune.sh" in words:
            world = nodes * (tasks or SLURM_DEFAULT_TASKS)
            start = words.index("slurm/optune.sh") + 1
        else:
            start = words.index("optune_nemo.train") + 1
        found.append((cmd, world, [w for w in words[start:] if "=" in w and not w.startswith("-")]))
    return found


@pytest.fixture()
def named_things(tmp_path, monkeypatch):
    """The paths and modules the documented commands name, made real (shape-only model directories)."""
    subs = {}
    for names, shape in ((("/lustre/models/Llama-3.1-8B-Instruct",), LLAMA_31_8B),
                         (("/models/Qwen2-0.5B-Instruct",), QWEN2_05B)):
        d = tmp_path / shape["model_type"]
        d.mkdir()
        (d / "config.json").write_text(json.dumps(shape))
        subs.update({n: str(d) for n in names})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?"}) + "\n" for i in range(8)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name in ("prompts", "heldout"):
        pq.write_table(pa.table({"prompt": [f"What is {i} + 2?" for i in range(8)]}), tmp_path / f"{name}.parquet")
        subs[f"/lustre/data/{name}.parquet"] = str(tmp_path / f"{name}.parquet")
    subs["prompts.jsonl"] = str(prompts)
    (tmp_path / "my_rewards.py").write_text("def score(prompts, responses, metadata):\n"
                                            "    return [0.0 for _ in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rm = tmp_path / "rm"
    rm.mkdir()
    subs["runs/rm"] = str(rm)
    return subs


def _check(overrides: list[str], world: int, subs: dict):
    from optune_nemo.train import check_inputs, check_plugins

    fixed = []
    for o in overrides:
        key, value = o.split("=", 1)
        fixed.append(f"{key}={subs.get(value, value)}")
    cfg = check_inputs(load_config(fixed), world_size=world)
    check_plugins(cfg)          # the plugin families' checks (names and what a member needs), as the entry point
    return cfg


def test_documented_train_commands_pass_the_preflight_checks(named_things):
    invocations = [inv for p in DOCS for inv in _train_invocations(p)]
    assert len(invocations) >= 8
    checked = 0
    for cmd, world, overrides in invocations:
        if any(o.startswith("reward.type=remote") for o in overrides):
            continue           # needs a live server: tests/e2e/test_serve_rm.py runs that path
        try:
            cfg = _check(overrides, world, named_things)
        except ConfigError as e:
            pytest.fail(f"{cmd!r} (world size {world}) fails its pre-flight check: {e}")
        tp = cfg.parallel.tensor_model_parallel_size
        assert cfg.model.num_attention_heads % tp == 0 and cfg.model.num_query_groups % tp == 0
        checked += 1
    assert checked >= 8
    assert any(w == 32 for _, w, _ in invocations) and any(w == 3 for _, w, _ in invocations)


def test_the_check_refuses_what_the_old_readme_showed(named_things):
    # TP=2 on SmolLM2 (9 heads, 3 KV heads) and TP=8 on the 14-head Qwen2-0.5B (the docs once showed both kinds)
    with pytest.raises(ConfigError, match="tensor_model_parallel_size"):
        _check(["parallel.tensor_model_parallel_size=2"], 2, named_things)
    with pytest.raises(ConfigError, match="tensor_model_parallel_size"):
        _check(["parallel.tensor_model_parallel_size=8", "policy.hf_path=/models/Qwen2-0.5B-Instruct"], 8,
               named_things)


def test_recorded_reports_have_their_runs_in_the_repository():
    """The pilot's and the decisive experiment's reports can be rebuilt from what the repository holds: every run
    a report.json lists is a directory under docs/results/ with its config, metrics and per-prompt records, and
    is tracked by git (a .gitignore rule once kept docs/results/decisive/runs/ out of every commit). The first
    recording (docs/results/report.json) predates the archive and is exempt."""
    reports = sorted(p for p in (REPO / "docs" / "results").glob("*/**/report.json") if "runs" not in p.parts)
    assert {p.relative_to(REPO).as_posix() for p in reports} >= {
        "docs/results/decisive/report/report.json", "docs/results/pilot/r0/report.json"}
    tracked = None
    if (REPO / ".git").exists():
        out = subprocess.run(["git", "ls-files", "docs/results"], cwd=REPO, capture_output=True, text=True)
        tracked = set(out.stdout.split()) if out.returncode == 0 else None
    for report in reports:
        runs = json.loads(report.read_text())["runs"]
        assert runs, report
        for run in runs:
            path = REPO / run["path"]
            assert run["path"].startswith("docs/results/") and path.is_dir(), (report, run["path"])
            for name in ("config.yaml", "metrics.jsonl", "COMPLETED"):
                assert (path / name).is_file(), (report, path / name)
                if tracked is not None:
                    assert f"{run['path']}/{name}" in tracked, f"{run['path']}/{name} is not tracked by git"
            assert list((path / "eval").glob("iter_*.parquet")), (report, path)
