"""An export killed half-way (SIGKILL while its files are written) leaves no `out_dir` at all, never a
partial one that transformers would half-load, and a previous export in its place stays as it was; the next
export removes the dead one's staging directory and commits a complete directory. Both exports
(`hf_export.export_hf`, `rm.hf.export_hf_rm`) write through `runtime.fileio.staged_dir`, driven here."""

import signal
import subprocess
import sys
import textwrap

import pytest

from optune_nemo.runtime.fileio import staged_dir

DIES = textwrap.dedent("""
    import os, signal, sys
    from optune_nemo.runtime.fileio import staged_dir
    with staged_dir(sys.argv[1], overwrite=True) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"half of the weights")
        os.kill(os.getpid(), signal.SIGKILL)
""")


def _killed_export(out) -> None:
    proc = subprocess.run([sys.executable, "-c", DIES, str(out)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


@pytest.mark.parametrize("previous", [False, True], ids=["first-export", "over-a-previous-export"])
def test_killed_export_leaves_no_out_dir_and_the_next_one_commits(tmp_path, previous):
    out = tmp_path / "hf" / "final"
    if previous:
        out.mkdir(parents=True)
        (out / "config.json").write_text('{"previous": true}')
    _killed_export(out)
    if previous:
        assert sorted(p.name for p in out.iterdir()) == ["config.json"]
        assert (out / "config.json").read_text() == '{"previous": true}'
    else:
        assert not out.exists()
    stale = list(out.parent.glob(".final.tmp-*"))
    assert len(stale) == 1 and (stale[0] / "model.safetensors").exists()
    with staged_dir(out, overwrite=True) as tmp:
        (tmp / "config.json").write_text('{"complete": true}')
    assert (out / "config.json").read_text() == '{"complete": true}'
    assert sorted(p.name for p in out.parent.iterdir()) == ["final"]      # the dead export's staging is gone
