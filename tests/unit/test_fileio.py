"""runtime/fileio.py: `staged_dir`, the stage-then-commit directory write of the HF exports. A block that
raises leaves the old directory as it was and no partial one; a block that ends replaces it whole. (A kill
inside the block: tests/unit/test_export_interrupted.py.)"""

import pytest

from optune_nemo.runtime.fileio import staged_dir


def _old(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("old")
    (path / "model.safetensors").write_bytes(b"old weights")


def _listing(path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_a_block_that_raises_leaves_the_old_directory_and_no_stage(tmp_path):
    out = tmp_path / "final"
    _old(out)
    with pytest.raises(RuntimeError, match="mid-write"), staged_dir(out, overwrite=True) as tmp:
        (tmp / "config.json").write_text("new")
        raise RuntimeError("mid-write")
    assert _listing(out) == {"config.json": b"old", "model.safetensors": b"old weights"}
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_a_first_write_that_raises_leaves_no_directory(tmp_path):
    out = tmp_path / "sub" / "final"
    with pytest.raises(KeyboardInterrupt), staged_dir(out) as tmp:
        (tmp / "config.json").write_text("new")
        raise KeyboardInterrupt
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_a_block_that_ends_replaces_the_directory_whole(tmp_path):
    out = tmp_path / "final"
    _old(out)
    with staged_dir(out, overwrite=True) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".final.tmp-") and list(tmp.iterdir()) == []
        (tmp / "config.json").write_text("new")
        assert _listing(out)["config.json"] == b"old"          # nothing visible before the commit
    assert _listing(out) == {"config.json": b"new"}             # the old files do not survive beside the new
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_an_empty_final_directory_is_taken_without_overwrite(tmp_path):
    (tmp_path / "final").mkdir()
    with staged_dir(tmp_path / "final") as tmp:
        (tmp / "a").write_text("a")
    assert _listing(tmp_path / "final") == {"a": b"a"}


def test_a_non_empty_final_is_refused_without_overwrite_and_nothing_is_written(tmp_path):
    out = tmp_path / "final"
    _old(out)
    with pytest.raises(ValueError, match=f"^--out: {out} exists and is not empty; choose a new directory$"):
        with staged_dir(out):
            pytest.fail("the block runs only after the check")
    with pytest.raises(ValueError, match="^hf.out: "):
        with staged_dir(out, key="hf.out"):
            pass
    assert _listing(out) == {"config.json": b"old", "model.safetensors": b"old weights"}
    assert [p.name for p in tmp_path.iterdir()] == ["final"]
