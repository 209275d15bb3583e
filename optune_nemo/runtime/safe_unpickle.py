"""Screen a dist-checkpoint's `.metadata` before megatron / torch.distributed.checkpoint unpickle it.

torch.distributed.checkpoint stores its metadata as a plain pickle and reads it with `pickle.load`, so a
model directory received from someone else could run arbitrary code at load. This module unpickles it
first with an allow-list of the globals such metadata uses (torch.distributed.checkpoint's own classes,
torch.Size, dtypes, the layout helper) and refuses anything else with a one-line error. The tensors
themselves (`*.distcp`) are raw storage, and megatron's `common.pt` is read with torch's weights-only
loader.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from optune_nemo.errors import CheckpointError, first_line

_MODULE_PREFIXES = ("torch.distributed.checkpoint.",)
_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
            ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice")}


def _allowed(module: str, name: str) -> bool:
    if module.startswith(_MODULE_PREFIXES) or (module, name) in _GLOBALS:
        return True
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


class _Screen(pickle.Unpickler):
    def find_class(self, module, name):
        if not _allowed(module, name):
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in checkpoint metadata")
        return super().find_class(module, name)


def check_dist_checkpoint(directory: str | Path) -> None:
    """Raise CheckpointError when `directory/.metadata` needs anything but checkpoint metadata to unpickle."""
    meta = Path(directory) / ".metadata"
    if not meta.is_file():
        return    # megatron reports a missing checkpoint itself
    try:
        with open(meta, "rb") as f:
            _Screen(f).load()
    except Exception as e:
        raise CheckpointError(f"{meta}: refusing to load this checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None


def load_dist_checkpoint(dist_checkpointing, sharded_state_dict: dict, directory: str | Path) -> dict:
    """`dist_checkpointing.load`, with any failure to read the files (a missing shard, an object the
    weights-only loader refuses in `common.pt`, a truncated file) as one CheckpointError naming the
    directory. Collective, like the load itself."""
    try:
        return dist_checkpointing.load(sharded_state_dict, str(directory))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:   # torch.distributed.checkpoint's CheckpointException is a BaseException
        failures = getattr(e, "failures", None)    # rank -> the exception behind it
        cause = next(iter(failures.values())) if isinstance(failures, dict) and failures else e
        cause = cause[0] if isinstance(cause, tuple) and cause else cause      # (exception, its frames)
        raise CheckpointError(f"{directory}: the model checkpoint cannot be loaded ({first_line(cause)})") from None
