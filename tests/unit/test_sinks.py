"""Metric sinks (optune_nemo/sinks/) behind MetricsWriter: a fake sink for the protocol (order, resume of the
tracker run, steps never sent twice, rank 0 only), then the real W&B (offline: its transaction log read back
by an independent reader of its on-disk format) and MLflow (a sqlite store read back with MlflowClient)."""

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from optune_nemo.config import ConfigError, LoggingConfig, MlflowConfig, WandbConfig, validate_logging
from optune_nemo.runtime.metrics import TRACKERS, MetricsWriter, read_metrics

ROOT = Path(__file__).resolve().parents[2]
RECORDS = [{"iteration": t, "loss": 0.5 - 0.1 * t, "regenerated": 8 + t, "flag": True, "precision": "fp32"}
           for t in range(4)]
EXAMPLES = {"1": [{"prompt": "What is 2 + 2?", "response": "4"}, {"prompt": "3 times 5?", "response": "15"}]}


# --------------------------------------------------------------------------- the protocol, with a fake sink


class FakeSink:
    """Records every call; `open` hands out run ids r1, r2, ... (a tracker's new run) or keeps the resumed."""

    runs = 0

    def __init__(self):
        self.calls = []

    def open(self, *, resume):
        if resume is None:
            FakeSink.runs += 1
        run = resume or {"run_id": f"r{FakeSink.runs}"}
        self.calls.append(("open", run["run_id"], resume is not None))
        return run

    def log_config(self, config):
        self.calls.append(("config", config))

    def log(self, scalars, step):
        self.calls.append(("log", step, scalars))

    def log_examples(self, rows, step):
        self.calls.append(("examples", step, rows))

    def close(self):
        self.calls.append(("close",))


def _writer(exp_dir, sink, *, enabled=True):
    return MetricsWriter(exp_dir, tensorboard=False, enabled=enabled, sinks={"fake": sink}, config={"seed": 7})


def _logged_steps(sink):
    return [c[1] for c in sink.calls if c[0] == "log"]


def test_records_reach_the_sink_once_with_their_numbers_only(tmp_path):
    FakeSink.runs = 0
    (tmp_path / "eval.json").write_text(json.dumps({"iterations": {"1": {"examples": EXAMPLES["1"]}}}))
    sink = FakeSink()
    w = _writer(tmp_path, sink)
    w.start_fresh()
    for r in RECORDS[:2]:
        w.add(r)
        w.flush()
    w.flush()                                       # nothing new: nothing sent
    w.close()
    assert sink.calls == [
        ("open", "r1", False), ("config", {"seed": 7}),
        ("log", 0, {"loss": 0.5, "regenerated": 8}),
        ("examples", 1, EXAMPLES["1"]), ("log", 1, {"loss": 0.4, "regenerated": 9}),
        ("close",)]
    assert read_metrics(tmp_path) == RECORDS[:2]
    assert json.loads((tmp_path / TRACKERS).read_text()) == {"fake": {"run": {"run_id": "r1"}, "last_step": 1}}


def test_resume_continues_the_tracker_run_and_skips_steps_it_has(tmp_path):
    """Checkpoint after iteration 1 (steps 0, 1 sent), iteration 2 sent without a checkpoint; a resume from
    the checkpoint continues run r1 and, re-running iteration 2, does not send step 2 again."""
    FakeSink.runs = 0
    first = FakeSink()
    w = _writer(tmp_path, first)
    w.start_fresh()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for r in RECORDS[:3]:
        w.add(r)
        if r["iteration"] == 1:
            w.save(ckpt)
        w.flush()
    w.close()
    second = FakeSink()
    again = _writer(tmp_path, second)
    again.load(ckpt)                                 # as CheckpointManager.restore does
    for r in RECORDS[2:]:
        again.add(r)
        again.flush()
    assert second.calls[0] == ("open", "r1", True)
    assert _logged_steps(first) == [0, 1, 2] and _logged_steps(second) == [3]
    assert read_metrics(tmp_path) == RECORDS
    assert json.loads((tmp_path / TRACKERS).read_text())["fake"] == {"run": {"run_id": "r1"}, "last_step": 3}


def test_a_fresh_start_opens_a_new_run_unless_the_old_one_got_nothing(tmp_path):
    FakeSink.runs = 0
    a = FakeSink()
    _writer(tmp_path, a).start_fresh()               # killed before iteration 0's record
    b = FakeSink()
    wb = _writer(tmp_path, b)
    wb.start_fresh()                                 # the same (empty) tracker run
    wb.add(RECORDS[0])
    wb.flush()
    c = FakeSink()
    _writer(tmp_path, c).start_fresh()               # checkpoint.save=false: records gone, a new tracker run
    assert [x.calls[0] for x in (a, b, c)] == [("open", "r1", False), ("open", "r1", True), ("open", "r2", False)]


def test_only_the_enabled_rank_talks_to_sinks(tmp_path):
    sink = FakeSink()
    w = _writer(tmp_path, sink, enabled=False)
    w.start_fresh()
    w.add(RECORDS[0])
    w.flush()
    w.close()
    assert sink.calls == [] and not any(tmp_path.iterdir())


def test_from_config_builds_no_tracker_on_other_ranks(tmp_path):
    from optune_nemo.config import OptuneNemoConfig

    cfg = OptuneNemoConfig(exp_dir=str(tmp_path))
    cfg.logging.wandb.enabled = cfg.logging.mlflow.enabled = True
    assert MetricsWriter.from_config(cfg, enabled=False).sinks == {}


def test_tags_come_from_the_config():
    import dataclasses

    from optune_nemo.config import OptuneNemoConfig
    from optune_nemo.rm.config import TrainRMConfig
    from optune_nemo.sinks import config_tags, user_tags

    cfg = OptuneNemoConfig(seed=3)
    cfg.optune.rho, cfg.optune.selection, cfg.loss.name = 0.3, "random", "dpo"
    assert config_tags(dataclasses.asdict(cfg)) == {"rho": "0.3", "selection": "random", "loss": "dpo", "seed": "3"}
    assert config_tags(dataclasses.asdict(TrainRMConfig(seed=5))) == {"seed": "5"}
    assert user_tags(["sweep=a", "baseline"]) == {"sweep": "a", "baseline": "true"}


# --------------------------------------------------------------------------- configuration errors


@pytest.mark.parametrize("section,package", [("wandb", "wandb"), ("mlflow", "mlflow")])
def test_a_tracker_without_its_package_is_a_config_error(monkeypatch, section, package):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    lg = LoggingConfig()
    getattr(lg, section).enabled = True
    with pytest.raises(ConfigError, match=rf"^logging\.{section}\.enabled: needs the {package} package "
                                          r"\(pip install 'optune-nemo\[tracking\]'\)"):
        validate_logging(lg)


def test_bad_tracker_values_name_the_key():
    with pytest.raises(ConfigError, match=r"^logging\.wandb\.mode: must be one of online, offline, disabled"):
        validate_logging(LoggingConfig(wandb=WandbConfig(mode="cloud")))
    with pytest.raises(ConfigError, match=r"^logging\.mlflow\.tracking_uri: no credentials in the URI"):
        validate_logging(LoggingConfig(mlflow=MlflowConfig(enabled=True, tracking_uri="https://u:p@host:5000")))


def test_cli_refuses_a_missing_tracker_package_before_any_write(tmp_path):
    """The entry point: exit 2, one line naming the key and what to install, no traceback, no exp_dir."""
    exp = tmp_path / "run"
    hide = ("import importlib.util, sys; real = importlib.util.find_spec; "
            "importlib.util.find_spec = lambda n, *a: None if n == 'wandb' else real(n, *a); "
            "from optune_nemo.train import main; sys.exit(main())")
    proc = subprocess.run([sys.executable, "-c", hide, "policy.hf_path=null", "eval.num_prompts=0",
                           "logging.wandb.enabled=true", f"exp_dir={exp}"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert lines[-1] == ("optune_nemo: configuration error: logging.wandb.enabled: needs the wandb package "
                         "(pip install 'optune-nemo[tracking]'), or set it to false"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not exp.exists()


# --------------------------------------------------------------------------- W&B, offline, read back


def wandb_env(monkeypatch, tmp_path):
    """W&B's own caches and settings in tmp (never the home directory); no network."""
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR", "WANDB_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)


def _wandb_records(path: Path):
    """The protobuf records of a W&B transaction log (run-<id>.wandb): a 7-byte file header (":W&B", a magic
    number, a version), then LevelDB log-format records (7-byte header: crc32, little-endian length, type
    full/first/middle/last) in 32 KiB blocks; read here independently of wandb's own writer."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:                                 # a block's zero-filled tail
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):                           # full, or last of a fragmented record
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def _finished_log(path: Path, timeout: float = 60.0) -> list:
    """The records of a run's transaction log once it ends with the run's exit record: W&B's service process
    writes the log asynchronously, after `run.finish()` has returned (a run still in flight is an error)."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(_wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            assert any(r.WhichOneof("record_type") == "exit" for r in records), f"{path} has no exit record"
            return records
        time.sleep(0.2)


def read_wandb(exp_dir: Path) -> dict:
    """Every offline W&B run directory of exp_dir/wandb, in order: {"runs": [{"id", "dir", "name", "project",
    "tags", "config"}], "history": {step: {key: value}} over all of them}."""
    runs, history = [], {}
    for run_dir in sorted((Path(exp_dir) / "wandb").glob("offline-run-*")):
        (log,) = run_dir.glob("run-*.wandb")
        for rec in _finished_log(log):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                r = rec.run
                runs.append({"id": r.run_id, "dir": run_dir, "name": r.display_name, "project": r.project,
                             "tags": list(r.tags),
                             "config": {u.key: json.loads(u.value_json) for u in r.config.update}})
            elif kind == "config":
                runs[-1]["config"].update({u.key: json.loads(u.value_json) for u in rec.config.update})
            elif kind == "history":
                row = {".".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item}
                history.setdefault(row["_step"], {}).update(row)
    return {"runs": runs, "history": history}


def _wandb_cfg(**kw):
    return LoggingConfig(tensorboard=False, wandb=WandbConfig(enabled=True, mode="offline", project="unit", **kw))


def _tracker_writer(exp_dir, lg, config):
    from optune_nemo.sinks import build_sinks

    return MetricsWriter(exp_dir, tensorboard=False, enabled=True,
                         sinks=build_sinks(lg, exp_dir=exp_dir, config=config), config=config)


CONFIG = {"seed": 11, "optune": {"rho": 0.5, "selection": "lowest_reward", "iterations": 2}, "loss": {"name": "wdpo"}}


def test_wandb_offline_run_holds_the_records_and_resumes(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    wandb_env(monkeypatch, tmp_path)
    exp = tmp_path / "exp"
    (exp).mkdir()
    (exp / "eval.json").write_text(json.dumps({"iterations": {"1": {"examples": EXAMPLES["1"]}}}))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    w = _tracker_writer(exp, _wandb_cfg(tags=["sweep=a"]), CONFIG)
    w.start_fresh()
    for r in RECORDS[:2]:
        w.add(r)
        w.save(ckpt)
        w.flush()
    w.close()
    time.sleep(1.1)          # W&B names an offline run's directory after the second it starts in
    resumed = _tracker_writer(exp, _wandb_cfg(tags=["sweep=a"]), {**CONFIG, "optune": {**CONFIG["optune"],
                                                                                      "iterations": 4}})
    resumed.load(ckpt)
    for r in RECORDS[2:]:
        resumed.add(r)
        resumed.flush()
    resumed.close()

    got = read_wandb(exp)
    saved = json.loads((exp / TRACKERS).read_text())["wandb"]
    assert [r["id"] for r in got["runs"]] == [saved["run"]["run_id"]] * 2 and saved["last_step"] == 3
    first = got["runs"][0]
    assert first["name"] == "exp" and first["project"] == "unit"
    assert sorted(first["tags"]) == sorted(["rho=0.5", "selection=lowest_reward", "loss=wdpo", "seed=11", "sweep=a"])
    assert first["config"]["optune"]["iterations"] == 2 and got["runs"][1]["config"]["optune"]["iterations"] == 4
    assert sorted(got["history"]) == [0, 1, 2, 3]
    for r in read_metrics(exp):
        row = got["history"][r["iteration"]]
        assert row["loss"] == pytest.approx(r["loss"]) and row["regenerated"] == r["regenerated"]
        assert "flag" not in row and "precision" not in row
    table_path = got["history"][1]["eval_examples.path"]
    table = json.loads((first["dir"] / "files" / table_path).read_text())
    assert table["columns"] == ["prompt", "response"]
    assert table["data"] == [[e["prompt"], e["response"]] for e in EXAMPLES["1"]]


# --------------------------------------------------------------------------- MLflow, a sqlite store, read back


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root / 'mlflow.db'}", root / "artifacts"


def test_mlflow_run_holds_the_records_and_resumes(tmp_path, mlflow_store):
    from mlflow.tracking import MlflowClient

    uri, artifacts = mlflow_store
    lg = LoggingConfig(tensorboard=False, mlflow=MlflowConfig(enabled=True, tracking_uri=uri, experiment="unit",
                                                              name="mine", tags=["sweep=a", "baseline"],
                                                              artifact_location=str(artifacts)))
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "eval.json").write_text(json.dumps({"iterations": {"1": {"examples": EXAMPLES["1"]}}}))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    w = _tracker_writer(exp, lg, CONFIG)
    w.start_fresh()
    for r in RECORDS[:3]:
        w.add(r)
        if r["iteration"] == 1:
            w.save(ckpt)
        w.flush()                                    # step 2 sent, its checkpoint lost
    w.close()
    resumed = _tracker_writer(exp, lg, {**CONFIG, "optune": {**CONFIG["optune"], "iterations": 4}})
    resumed.load(ckpt)
    for r in RECORDS[2:]:
        resumed.add({**r, "loss": r["loss"] + 1.0} if r["iteration"] == 2 else r)   # the re-run differs
        resumed.flush()
    resumed.close()

    run_id = json.loads((exp / TRACKERS).read_text())["mlflow"]["run"]["run_id"]
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "mine"
    assert len(client.search_runs([client.get_experiment_by_name("unit").experiment_id])) == 1
    assert {k: run.data.tags[k] for k in ("rho", "selection", "loss", "seed", "sweep", "baseline")} == {
        "rho": "0.5", "selection": "lowest_reward", "loss": "wdpo", "seed": "11", "sweep": "a", "baseline": "true"}
    assert run.data.params["optune.iterations"] == "2" and run.data.params["seed"] == "11"   # params are immutable
    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in history] == [0, 1, 2, 3]     # step 2 once: the value sent before the resume
    assert [m.value for m in history] == pytest.approx([r["loss"] for r in RECORDS])
    assert [m.step for m in client.get_metric_history(run_id, "regenerated")] == [0, 1, 2, 3]
    assert client.get_metric_history(run_id, "flag") == []
    local = Path(client.download_artifacts(run_id, "eval_examples/iter_000001.json", str(tmp_path / "dl")))
    assert json.loads(local.read_text()) == {"columns": ["prompt", "response"],
                                             "data": [[e["prompt"], e["response"]] for e in EXAMPLES["1"]]}
    config = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path / "dl2"))).read_text()
    assert "iterations: 4" in config                 # rewritten at the resume


def test_secrets_in_the_environment_never_reach_a_file(tmp_path, monkeypatch, mlflow_store):
    pytest.importorskip("wandb")
    wandb_env(monkeypatch, tmp_path)
    secrets = {"WANDB_API_KEY": "0123456789abcdef0123456789abcdefsecret01",
               "MLFLOW_TRACKING_TOKEN": "mlflow-token-secret-4711", "MLFLOW_TRACKING_PASSWORD": "pw-secret-0815"}
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    uri, artifacts = mlflow_store
    lg = LoggingConfig(tensorboard=True, wandb=WandbConfig(enabled=True, mode="offline"),
                       mlflow=MlflowConfig(enabled=True, tracking_uri=uri, experiment="secrets",
                                           artifact_location=str(artifacts)))
    exp = tmp_path / "exp"
    w = _tracker_writer(exp, lg, CONFIG)
    w.start_fresh()
    w.add(RECORDS[0])
    w.flush()
    w.close()
    assert len(read_wandb(exp)["runs"]) == 1              # waits for W&B's last writes
    files = [p for p in [*exp.rglob("*"), *artifacts.parent.rglob("*")] if p.is_file()]
    assert any("wandb" in p.parts for p in files) and any("tensorboard" in p.parts for p in files)
    for p in files:
        data = p.read_bytes()
        for k, v in secrets.items():
            assert v.encode() not in data, f"{k} found in {p}"


# --------------------------------------------------------------------------- TensorBoard, read back


def test_tensorboard_events_hold_the_records(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    w = MetricsWriter(tmp_path, tensorboard=True, enabled=True)
    w.start_fresh()
    for r in RECORDS:
        w.add(r)
        w.flush()
    w.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["loss", "regenerated"]
    for key in ("loss", "regenerated"):
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [r["iteration"] for r in RECORDS]
        assert [v for _, v in got] == pytest.approx([r[key] for r in RECORDS], rel=1e-6)


def test_wandb_online_without_a_key_is_a_config_error(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    wandb_env(monkeypatch, tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))       # no ~/.netrc from `wandb login`
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    # nothing may leave this machine: W&B's server is a closed loopback port here (a run without this once
    # looked the public host up before it noticed that no key was set)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    # W&B's service process is shared by every run of this process and keeps the environment it started with
    # (an earlier test's): stop it, so the one this run starts reads the settings above
    import wandb

    wandb.teardown()
    lg = LoggingConfig(tensorboard=False, wandb=WandbConfig(enabled=True, mode="online"))
    w = _tracker_writer(tmp_path / "exp", lg, CONFIG)
    with pytest.raises(ConfigError, match=r"^logging\.wandb\.mode: online refused by W&B: No API key"):
        w.start_fresh()
