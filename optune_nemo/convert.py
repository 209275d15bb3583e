"""`python -m optune_nemo.convert hf-to-mcore|mcore-to-hf ...`: the command line of
`optune_nemo.megatron.convert` (HF / GGUF <-> megatron dist checkpoints; docs/models.md)."""

import sys

from optune_nemo.megatron.convert import main

if __name__ == "__main__":
    sys.exit(main())
