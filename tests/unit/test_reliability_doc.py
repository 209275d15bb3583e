"""docs/reliability.md keeps its promise: every row of the fault matrix names at least one test, and every
test it names exists (the file, and a test function of that name in it)."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "reliability.md"
REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def _matrix_rows() -> list[str]:
    text = DOC.read_text()
    table = text[text.index("| fault |"):]
    rows = [line for line in table.splitlines() if line.startswith("|")]
    return [r for r in rows[2:]]          # past the header and its rule


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test_")}


def test_every_row_names_a_test():
    rows = _matrix_rows()
    assert len(rows) >= 10
    for row in rows:
        assert REF.search(row), f"a fault without a test: {row[:80]}"


def test_every_named_test_exists():
    missing = []
    for path, name in REF.findall(DOC.read_text()):
        file = REPO / path
        if not file.is_file() or name not in _tests_in(file):
            missing.append(f"{path}::{name}")
    assert not missing, missing


def test_the_check_catches_a_missing_test(tmp_path):
    """The parser sees a test that is not there (a guard against a check that cannot fail)."""
    assert "test_kill_then_resume_is_identical" in _tests_in(REPO / "tests" / "e2e" / "test_crash_resume.py")
    assert "test_no_such_thing" not in _tests_in(REPO / "tests" / "e2e" / "test_crash_resume.py")
