"""`python -m optune_nemo.train_rm`: kept for scripts; the module is `optune_nemo.rm.train`."""

from optune_nemo.rm.train import main

if __name__ == "__main__":
    raise SystemExit(main())
