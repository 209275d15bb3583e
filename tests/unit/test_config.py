"""The config schema, conf/optune.yaml and the validation of bad values (the sections' own checks,
`config.validate`, and the plugin families', `plugins.check_plugins`)."""

import subprocess
import sys

import pytest

from optune_nemo.config import CONF_DIR, ConfigError, OptuneNemoConfig, load_config, render_yaml
from optune_nemo.config import validate as validate_sections
from optune_nemo.train import check_plugins


def validate(cfg: OptuneNemoConfig, world_size: int = 1) -> None:
    """What the entry point checks before any work: every section, then every plugin family."""
    validate_sections(cfg, world_size=world_size)
    check_plugins(cfg)


def test_yaml_is_the_schema_rendered():
    assert (CONF_DIR / "optune.yaml").read_text() == render_yaml(), (
        "conf/optune.yaml is stale: run `python -m optune_nemo.config > conf/optune.yaml`")


def test_yaml_defaults_equal_schema_defaults():
    assert load_config() == OptuneNemoConfig()


def test_every_field_has_a_comment():
    for line in render_yaml().splitlines():
        if line.rstrip().endswith("#"):
            pytest.fail(f"field without a docstring in the schema: {line.strip()}")


def test_public_keys_exist_and_override():
    cfg = load_config(["exp_dir=/tmp/x", "seed=7", "optune.iterations=5", "optune.rho=0.25",
                       "optune.selection=random", "loss.name=dpo", "loss.beta1=0.2", "loss.beta2=3",
                       "parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"])
    assert (cfg.exp_dir, cfg.seed, cfg.optune.iterations, cfg.optune.rho) == ("/tmp/x", 7, 5, 0.25)
    assert (cfg.optune.selection, cfg.loss.name, cfg.loss.beta1, cfg.loss.beta2) == ("random", "dpo", 0.2, 3.0)
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.parallel.pipeline_model_parallel_size == 2


def test_reward_target_is_user_overridable():
    cfg = load_config(["reward.function._target_=my_module.my_reward", "++reward.function.scale=2"])
    assert cfg.reward.function == {"_target_": "my_module.my_reward", "scale": 2}


@pytest.mark.parametrize("override", ["optune.nonexistent=1", "model.hidden=3", "bogus=1"])
def test_unknown_keys_rejected(override):
    with pytest.raises(Exception, match="not in struct|Could not override|Key .* not"):
        load_config([override])


@pytest.mark.parametrize("override", ["optune.rho=abc", "optune.iterations=1.5", "seed=x"])
def test_wrong_types_rejected(override):
    with pytest.raises(Exception) as err:
        load_config([override])
    text = f"{err.value} {err.value.__cause__}"
    assert override.split("=")[0] in text and "could not be converted" in text, text


@pytest.mark.parametrize("overrides,world,key", [
    (["optune.rho=0"], 1, "optune.rho"),
    (["optune.rho=1.5"], 1, "optune.rho"),
    (["optune.rho=-0.1"], 1, "optune.rho"),
    (["optune.selection=best"], 1, "optune.selection"),
    (["optune.selection=all", "optune.rho=0.5"], 1, "optune.rho"),
    (["optune.iterations=0"], 1, "optune.iterations"),
    (["loss.name=simpo"], 1, "loss.name"),
    (["loss.label_smoothing=0.5"], 1, "loss.label_smoothing"),
    (["reward.type=mystery"], 1, "reward.type"),
    (["reward.type=hf"], 1, "reward.path"),
    (["reward.type=remote"], 1, "reward.url"),
    (["loss.beta1=0"], 1, "loss.beta1"),
    (["loss.beta2=-1"], 1, "loss.beta2"),
    (["parallel.tensor_model_parallel_size=3"], 3, "parallel.tensor_model_parallel_size"),
    (["parallel.tensor_model_parallel_size=2"], 1, "parallel.tensor_model_parallel_size"),
    (["parallel.tensor_model_parallel_size=4", "model.num_query_groups=2"], 4,
     "parallel.tensor_model_parallel_size"),
    (["parallel.pipeline_model_parallel_size=3"], 3, "parallel.pipeline_model_parallel_size"),
    (["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"], 2, "parallel"),
    (["model.num_query_groups=3"], 1, "model.num_query_groups"),
    (["train.global_batch_size=6", "train.micro_batch_size=4"], 1, "train.global_batch_size"),
    (["train.micro_batch_tokens=-1"], 1, "train.micro_batch_tokens"),
    (["generation.top_p=0"], 1, "generation.top_p"),
    (["generation.temperature=-1"], 1, "generation.temperature"),
    (["data.path=prompts.csv"], 1, "data.path"),
    (["data.overlong_prompts=drop"], 1, "data.overlong_prompts"),
    (["model.seq_length=16"], 1, "model.seq_length"),
    (["resume=/does/not/exist"], 1, "resume"),
    (["generation.engine=vllm"], 1, "generation.engine"),
])
def test_bad_values_name_the_key(overrides, world, key):
    cfg = load_config(overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=world)
    assert str(err.value).startswith(key), str(err.value)
    assert "\n" not in str(err.value)


def test_valid_layouts_pass():
    validate(load_config(), world_size=1)
    validate(load_config(["parallel.tensor_model_parallel_size=2"]), world_size=2)
    validate(load_config(["parallel.pipeline_model_parallel_size=2"]), world_size=2)
    validate(load_config(["train.global_batch_size=16", "train.micro_batch_size=4"]), world_size=2)
    validate(load_config(["train.micro_batch_tokens=1"]))           # below any pair's length: one pair a row
    validate(load_config(["train.micro_batch_tokens=4096"]), world_size=2)
    validate(load_config(["optune.rho=1e-9"]))
    validate(load_config(["optune.selection=all", "optune.rho=1"]))


@pytest.mark.parametrize("args,key", [(["optune.rho=0"], "optune.rho"),
                                      (["loss.beta1=-2"], "loss.beta1")])
def test_cli_stops_before_any_work(tmp_path, args, key):
    exp = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "optune_nemo.train", f"exp_dir={exp}", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and key in lines[0], proc.stderr
    assert not exp.exists(), "nothing may be written for a bad config"


def test_cli_unknown_key_exits_nonzero(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "optune_nemo.train", f"exp_dir={tmp_path}/r", "optune.foo=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "optune.foo" in proc.stderr


def test_config_imports_nothing_of_the_project_but_errors():
    """config.py is the ground the rest stands on: importing it (and validating) loads no plugin family."""
    code = ("import sys; from optune_nemo.config import OptuneNemoConfig, validate; validate(OptuneNemoConfig()); "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('optune_nemo'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["optune_nemo", "optune_nemo.config", "optune_nemo.errors"]


@pytest.mark.parametrize("overrides", [["loss.name=simpo"], ["reward.type=mystery"], ["generation.engine=vllm"],
                                       ["data.task=poetry"], ["optune.selection=best"]])
def test_family_names_are_the_families_checks(overrides):
    """A member's name is checked by its family (plugins.check_plugins), not by the sections' validate."""
    cfg = load_config(overrides)
    validate_sections(cfg)
    with pytest.raises(ConfigError, match=overrides[0].split("=")[0]):
        check_plugins(cfg)
