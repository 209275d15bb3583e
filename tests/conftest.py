import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))


_PYTRITON_FILES = {"tests/unit/test_remote_reward.py", "tests/e2e/test_serve_rm.py"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Groups for `make test`'s pytest-xdist run (--dist loadgroup): one group per test file, so a
    module's fixtures are built once, and every Slurm test in one group: the CI cluster is one node that may
    fit only one two-task job at a time (a second job would wait in the queue against its timeout). The
    files that start PyTriton servers share one group too: two Triton servers starting at once on the two
    workers failed a clean-clone CI run once (serve_rm exited with 1 before it was ready)."""
    for item in items:
        path = item.nodeid.split("::")[0]
        group = ("slurm" if item.get_closest_marker("slurm")
                 else "pytriton" if path in _PYTRITON_FILES else path)
        item.add_marker(pytest.mark.xdist_group(group))
