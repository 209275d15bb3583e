"""The one registry every plugin family uses (optune_nemo/registry.py): registering, duplicates, unknown names
(a ConfigError naming the key and the allowed names), members named by import path, members that register
themselves in a package's modules; and that every family lists exactly its members, in the order users read."""

import subprocess
import sys
import textwrap

import pytest

from optune_nemo.errors import ConfigError
from optune_nemo.registry import Registry


def double(x):
    return 2 * x


def test_register_and_get():
    family = Registry("thing.name")

    @family.register("b")
    def b():
        return "b"

    family.register("a")(double)
    assert family.get("a") is double and family.get("b") is b
    assert family.names() == ("a", "b")                   # sorted
    family.check("a")


def test_registration_order_where_asked():
    family = Registry("thing.name", sort=False)
    for name in ("zeta", "alpha", "mu"):
        family.register(name)(object())
    assert family.names() == ("zeta", "alpha", "mu")


def test_a_name_registered_twice_is_refused():
    family = Registry("thing.name")
    family.register("a")(double)
    family.register("a")(double)                          # the same member again (a module imported twice): fine
    with pytest.raises(ValueError, match=r"thing.name: 'a' is registered twice"):
        family.register("a")(len)
    with pytest.raises(ValueError, match="registered twice"):
        family.register_path("a", "os.path:join")


def test_an_unknown_name_names_the_key_and_the_allowed_names():
    family = Registry("thing.name")
    family.register("b")(len)
    family.register("a")(double)
    with pytest.raises(ConfigError) as err:
        family.check("c")
    assert str(err.value) == "thing.name: must be one of a, b (got 'c')"
    with pytest.raises(ConfigError) as err:
        family.get("c")
    assert str(err.value) == "thing.name: must be one of a, b (got 'c')"


def test_import_paths_where_the_family_allows_them():
    family = Registry("thing.name", outside="module:function")
    family.register("a")(double)
    assert family.get(f"{__name__}:double") is double
    family.check("no_such_module_xyz:f")                  # checking a path does not import it
    with pytest.raises(ConfigError, match=r"^thing.name: cannot import 'no_such_module_xyz:f' \(No module"):
        family.get("no_such_module_xyz:f")
    with pytest.raises(ConfigError, match=r"^thing.name: cannot import 'os:no_such_attribute_xyz' \("):
        family.get("os:no_such_attribute_xyz")
    with pytest.raises(ConfigError) as err:
        family.get("b")
    assert str(err.value) == "thing.name: must be one of a or module:function (got 'b')"


def test_no_import_paths_where_the_family_has_none():
    family = Registry("thing.name")
    family.register("a")(double)
    for name in (f"{__name__}:double", "os:getcwd"):
        with pytest.raises(ConfigError, match=r"^thing.name: must be one of a \(got"):
            family.check(name)
        with pytest.raises(ConfigError, match=r"^thing.name: must be one of a \(got"):
            family.get(name)


def test_a_member_registered_by_path_is_imported_on_first_use(tmp_path, monkeypatch):
    (tmp_path / "lazy_member_for_registry_tests.py").write_text("def member():\n    return 'lazy'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    family = Registry("thing.name", sort=False)
    family.register_path("lazy", "lazy_member_for_registry_tests:member")
    family.check("lazy")
    assert family.names() == ("lazy",)
    assert "lazy_member_for_registry_tests" not in sys.modules
    assert family.get("lazy")() == "lazy"
    family.register_path("broken", "lazy_member_for_registry_tests:nothing")
    with pytest.raises(ConfigError, match="thing.name: cannot import 'lazy_member_for_registry_tests:nothing'"):
        family.get("broken")


def test_members_in_a_package_register_themselves(tmp_path, monkeypatch):
    """One file per member: the package's modules are imported on the first look-up; the unsorted listing
    follows the package's modules whichever of them something imported first."""
    pkg = tmp_path / "plugins_for_registry_tests"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from optune_nemo.registry import Registry\n"
                                     "FAMILY = Registry('thing.name', __name__, sort=False)\n")
    for module, name in (("a_first", "zeta"), ("b_second", "alpha"), ("c_third", "mu")):
        (pkg / f"{module}.py").write_text(textwrap.dedent(f"""\
            from plugins_for_registry_tests import FAMILY

            @FAMILY.register({name!r})
            def member():
                return {name!r}
            """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import plugins_for_registry_tests.c_third  # noqa: F401  (someone imports a member's module first)
    from plugins_for_registry_tests import FAMILY

    assert FAMILY.names() == ("zeta", "alpha", "mu")
    assert FAMILY.get("alpha")() == "alpha"
    with pytest.raises(ConfigError, match=r"^thing.name: must be one of zeta, alpha, mu \(got 'omega'\)$"):
        FAMILY.check("omega")


# --------------------------------------------------------------------------- the families


def test_every_family_lists_exactly_its_members():
    from optune_nemo.data.tasks import TASKS
    from optune_nemo.generation import ENGINES
    from optune_nemo.losses import LOSSES
    from optune_nemo.reward import REWARD_TYPES
    from optune_nemo.selection import STRATEGIES
    from optune_nemo.sinks import SINKS

    assert STRATEGIES.names() == ("all", "lowest_reward", "oldest", "random", "smallest_gap")
    assert LOSSES.names() == ("cdpo", "dpo", "ipo", "wdpo")
    assert ENGINES.names() == ("torch", "trtllm")
    assert REWARD_TYPES.names() == ("rule", "hf", "megatron", "remote")
    assert TASKS.names() == ("arithmetic",)
    assert SINKS.names() == ("tensorboard", "wandb", "mlflow")
    keys = {f.key for f in (STRATEGIES, LOSSES, ENGINES, REWARD_TYPES, TASKS)}
    assert keys == {"optune.selection", "loss.name", "generation.engine", "reward.type", "data.task"}


def test_every_family_refuses_an_unknown_name_in_one_line():
    from optune_nemo.data.tasks import TASKS
    from optune_nemo.generation import ENGINES
    from optune_nemo.losses import LOSSES
    from optune_nemo.reward import REWARD_TYPES
    from optune_nemo.selection import STRATEGIES

    expected = {
        STRATEGIES: "optune.selection: must be one of all, lowest_reward, oldest, random, smallest_gap or "
                    "module:attribute (got 'nope')",
        LOSSES: "loss.name: must be one of cdpo, dpo, ipo, wdpo or module:Class (got 'nope')",
        ENGINES: "generation.engine: must be one of torch, trtllm (got 'nope')",
        REWARD_TYPES: "reward.type: must be one of rule, hf, megatron, remote (got 'nope')",
        TASKS: "data.task: must be one of arithmetic (got 'nope')",
    }
    for family, message in expected.items():
        with pytest.raises(ConfigError) as err:
            family.get("nope")
        assert str(err.value) == message


def test_checking_names_imports_no_optional_backend():
    """Naming trtllm, or listing the sinks, imports neither TensorRT-LLM's engine module nor the wandb /
    mlflow sinks (they import their packages when imported): a torch run never loads them."""
    code = ("import sys; from optune_nemo.config import load_config; from optune_nemo.train import check_plugins; "
            "from optune_nemo.sinks import SINKS; "
            "check_plugins(load_config(['generation.engine=trtllm'])); SINKS.names(); "
            "print(' '.join(m for m in ('optune_nemo.generation.trtllm_engine', 'optune_nemo.sinks.wandb', "
            "'optune_nemo.sinks.mlflow', 'optune_nemo.sinks.tensorboard', 'tensorrt_llm', 'wandb', 'mlflow') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == []
