"""`python -m optune_nemo.sweep`: kept for scripts; the module is `optune_nemo.analysis.sweep`."""

from optune_nemo.analysis.sweep import main

if __name__ == "__main__":
    raise SystemExit(main())
