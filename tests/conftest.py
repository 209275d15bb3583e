import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Groups for `make test`'s pytest-xdist run (--dist loadgroup): one group per test file, so a
    module's fixtures are built once, and every Slurm test in one group: the CI cluster is one node that may
    fit only one two-task job at a time (a second job would wait in the queue against its timeout)."""
    for item in items:
        group = "slurm" if item.get_closest_marker("slurm") else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))
