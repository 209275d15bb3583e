"""The train_rm schema, conf/train_rm.yaml and the validation of bad values."""

from __future__ import annotations

import dataclasses

import pytest

from optune_nemo import config
from optune_nemo.config import CONF_DIR, ConfigError
from optune_nemo.rm.config import TrainRMConfig, load_config, render_yaml, validate


def test_yaml_is_the_schema_rendered():
    assert (CONF_DIR / "train_rm.yaml").read_text() == render_yaml(), (
        "conf/train_rm.yaml is stale: run `python -m optune_nemo.rm.config > conf/train_rm.yaml`")


def test_yaml_defaults_equal_schema_defaults():
    assert load_config() == TrainRMConfig()


def test_every_field_has_a_comment():
    for line in render_yaml().splitlines():
        if line.rstrip().endswith("#"):
            pytest.fail(f"field without a docstring in the schema: {line.strip()}")


def test_shared_sections_are_optune_s_own():
    types = {f.name: f.type for f in dataclasses.fields(TrainRMConfig)}
    for name, cls in (("policy", "PolicyConfig"), ("model", "ModelConfig"), ("parallel", "ParallelConfig"),
                      ("optim", "OptimConfig"), ("checkpoint", "CheckpointConfig"), ("logging", "LoggingConfig")):
        assert types[name] == cls and type(getattr(TrainRMConfig(), name)) is getattr(config, cls)


@pytest.fixture()
def data(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    return f"data.path={path}"


@pytest.mark.parametrize("overrides, world, key", [
    ([], 1, "data.path"),
    (["data.path=/no/such.jsonl"], 1, "data.path"),
    (["data.path=prefs.csv"], 1, "data.path"),
    (["DATA", "data.eval_path=held.txt"], 1, "data.eval_path"),
    (["DATA", "precision=fp8"], 1, "precision"),
    (["DATA", "precision=bf16", "parallel.use_distributed_optimizer=false"], 1, "parallel.use_distributed_optimizer"),
    (["DATA", "rm.epochs=0"], 1, "rm.epochs"),
    (["DATA", "rm.micro_batch_size=0"], 1, "rm.micro_batch_size"),
    (["DATA", "rm.global_batch_size=6", "rm.micro_batch_size=4"], 1, "rm.global_batch_size"),
    (["DATA", "rm.global_batch_size=4", "rm.micro_batch_size=4"], 2, "rm.global_batch_size"),
    (["DATA", "rm.eval_fraction=1.0"], 1, "rm.eval_fraction"),
    (["DATA", "rm.eval_every=0"], 1, "rm.eval_every"),
    (["DATA", "rm.save_every=-1"], 1, "rm.save_every"),
    (["DATA", "rm.overlong=reject"], 1, "rm.overlong"),
    (["DATA", "rm.init_from=/no/such/run", "policy.hf_path=null"], 1, "rm.init_from"),
    (["DATA", "rm.init_from=/tmp", "policy.hf_path=smollm2"], 1, "rm.init_from"),
    (["DATA", "policy.hf_path=/no/such/model"], 1, "policy.hf_path"),
    (["DATA", "policy.export_hf_every_iteration=true"], 1, "policy.export_hf_every_iteration"),
    (["DATA", "parallel.tensor_model_parallel_size=3"], 3, "parallel.tensor_model_parallel_size"),
    (["DATA", "parallel.pipeline_model_parallel_size=3"], 3, "parallel.pipeline_model_parallel_size"),
    (["DATA", "parallel.tensor_model_parallel_size=2"], 1, "parallel.tensor_model_parallel_size"),
    (["DATA", "model.num_query_groups=3"], 1, "model.num_query_groups"),
    (["DATA", "optim.lr=0"], 1, "optim.lr"),
    (["DATA", "optim.lr_decay_style=step"], 1, "optim.lr_decay_style"),
    (["DATA", "checkpoint.keep_last=-1"], 1, "checkpoint.keep_last"),
    (["DATA", "resume=/no/such/dir"], 1, "resume"),
    (["DATA", "logging.level=LOUD"], 1, "logging.level"),
])
def test_bad_values_name_the_key(overrides, world, key, data):
    cfg = load_config(["policy.hf_path=null", *[data if o == "DATA" else o for o in overrides]])
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=world)
    assert str(err.value).startswith(key), str(err.value)
    assert "\n" not in str(err.value)


def test_valid_layouts_pass(data):
    base = ["policy.hf_path=null", data]
    validate(load_config(base))
    validate(load_config([*base, "parallel.tensor_model_parallel_size=2"]), world_size=2)
    validate(load_config([*base, "parallel.pipeline_model_parallel_size=2"]), world_size=2)
    validate(load_config([*base, "rm.global_batch_size=16", "rm.micro_batch_size=4"]), world_size=4)
    validate(load_config([*base, "precision=bf16", "parallel.use_distributed_optimizer=true"]))
