"""`python -m optune_nemo.report`: kept for scripts; the module is `optune_nemo.analysis.report`."""

from optune_nemo.analysis.report import main

if __name__ == "__main__":
    raise SystemExit(main())
