"""W&B (offline) and MLflow (a sqlite store) on a tiny real run through the entry point: every record of
metrics.jsonl and the held-out examples of eval.json reach both trackers; the resumed invocation continues
the same tracker runs; keys set in the environment reach no file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_optune_loop import E2E

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_sinks import read_wandb  # noqa: E402

from optune_nemo.runtime.metrics import TRACKERS, read_metrics  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SECRETS = {"WANDB_API_KEY": "fedcba9876543210fedcba9876543210secret99",
           "MLFLOW_TRACKING_TOKEN": "e2e-mlflow-token-secret-1234", "MLFLOW_TRACKING_PASSWORD": "e2e-pw-secret-5678"}


def _run(exp, store, artifacts, env, *overrides):
    cmd = [sys.executable, "-m", "optune_nemo.train", *E2E, f"exp_dir={exp}", "eval.num_prompts=4",
           "eval.max_new_tokens=6", "logging.wandb.enabled=true", "logging.wandb.mode=offline",
           "logging.wandb.project=e2e", "logging.mlflow.enabled=true", f"logging.mlflow.tracking_uri={store}",
           "logging.mlflow.experiment=e2e", f"logging.mlflow.artifact_location={artifacts}",
           "logging.mlflow.tags=['suite=e2e']", "logging.wandb.tags=['suite=e2e']", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_trackers_follow_a_run_and_its_resume(tmp_path):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    exp, store, artifacts = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "mlartifacts"
    env = {**os.environ, "OMP_NUM_THREADS": "1", **SECRETS, "WANDB_SILENT": "true",
           **{v: str(tmp_path / "wandb_home" / v.lower()) for v in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR",
                                                                    "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR")}}
    env.pop("WANDB_MODE", None)
    _run(exp, store, artifacts, env, "optune.iterations=2")
    first = json.loads((exp / TRACKERS).read_text())
    _run(exp, store, artifacts, env, "optune.iterations=3")
    trackers = json.loads((exp / TRACKERS).read_text())
    assert trackers == {"wandb": {"run": first["wandb"]["run"], "last_step": 2},
                        "mlflow": {"run": first["mlflow"]["run"], "last_step": 2}}
    records = read_metrics(exp)
    assert [r["iteration"] for r in records] == [0, 1, 2]
    numeric = [k for k, v in records[0].items() if k != "iteration" and type(v) in (int, float)]
    examples = {int(t): [[e["prompt"], e["response"]] for e in v["examples"]]
                for t, v in json.loads((exp / "eval.json").read_text())["iterations"].items()}
    assert sorted(examples) == [0, 1, 2] and "eval_reward_mean" in numeric

    wb = read_wandb(exp)
    assert [r["id"] for r in wb["runs"]] == [trackers["wandb"]["run"]["run_id"]] * 2
    assert "suite=e2e" in wb["runs"][0]["tags"] and "rho=0.5" in wb["runs"][0]["tags"]
    assert sorted(wb["history"]) == [0, 1, 2]
    for r in records:
        row = wb["history"][r["iteration"]]
        for key in numeric:
            assert row[key] == pytest.approx(r[key], rel=1e-12), (r["iteration"], key)
        run_dir = wb["runs"][0 if r["iteration"] < 2 else 1]["dir"]
        table = json.loads((run_dir / "files" / row["eval_examples.path"]).read_text())
        assert table["data"] == examples[r["iteration"]]

    client = MlflowClient(tracking_uri=store)
    run_id = trackers["mlflow"]["run"]["run_id"]
    assert len(client.search_runs([client.get_experiment_by_name("e2e").experiment_id])) == 1
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run" and run.data.tags["suite"] == "e2e"
    for key in numeric:
        history = client.get_metric_history(run_id, key)
        assert [m.step for m in history] == [0, 1, 2], key
        assert [m.value for m in history] == pytest.approx([float(r[key]) for r in records], rel=1e-12), key
    for t, rows in examples.items():
        path = client.download_artifacts(run_id, f"eval_examples/iter_{t:06d}.json", str(tmp_path / f"dl{t}"))
        assert json.loads(Path(path).read_text())["data"] == rows

    for p in tmp_path.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            for k, v in SECRETS.items():
                assert v.encode() not in data, f"{k} found in {p}"
