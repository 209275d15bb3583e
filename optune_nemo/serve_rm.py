"""`python -m optune_nemo.serve_rm`: kept for scripts; the module is `optune_nemo.rm.serve`."""

from optune_nemo.rm.serve import main

if __name__ == "__main__":
    raise SystemExit(main())
