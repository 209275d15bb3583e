"""An export killed half-way (SIGKILL while its files are written) leaves no `out_dir` at all, never a
partial one that transformers would half-load; the next export removes the dead one's staging directory
and commits a complete directory."""

import signal
import subprocess
import sys
import textwrap

from optune_nemo.megatron.hf_export import commit_out_dir, prepare_out_dir

DIES = textwrap.dedent("""
    import os, signal, sys
    from optune_nemo.megatron.hf_export import prepare_out_dir
    tmp = prepare_out_dir(sys.argv[1])
    (tmp / "config.json").write_text("{}")
    (tmp / "model.safetensors").write_bytes(b"half of the weights")
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_killed_export_leaves_no_out_dir_and_the_next_one_commits(tmp_path):
    out = tmp_path / "hf" / "final"
    proc = subprocess.run([sys.executable, "-c", DIES, str(out)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists()
    stale = list(out.parent.glob(".final.tmp-*"))
    assert len(stale) == 1 and (stale[0] / "model.safetensors").exists()
    tmp = prepare_out_dir(out)
    (tmp / "config.json").write_text('{"complete": true}')
    commit_out_dir(tmp, out)
    assert (out / "config.json").read_text() == '{"complete": true}'
    assert sorted(p.name for p in out.parent.iterdir()) == ["final"]      # the dead export's staging is gone
