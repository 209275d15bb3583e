"""Copy the finished runs of an experiment into a compact archive that the report reads as it reads the
originals, so that an experiment spanning several sittings (experiments/decisive.sh) keeps what each sitting
finished, in the repository, without model shards:

    python scripts/archive_runs.py ROOT DEST

Every COMPLETED run directory under ROOT/base/ and ROOT/runs/ (the sweep's layout) goes to the same place under
DEST: config.yaml, metrics.jsonl, eval.json, COMPLETED, the per-prompt held-out records eval/*.parquet, and
fork.json with its init_from rewritten relative to the run directory (so the archive can move). The rollout
stores checkpoints/iter_*/rollouts.parquet are kept for the bases and the rho = 1 runs (the report's Fig. 2
analysis reads them); model and optimizer shards, logs, TensorBoard events and figures stay behind. An
unfinished run is skipped (rerun after it finished). Prints one JSON line: the runs archived and the bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import yaml

KEEP = ("config.yaml", "metrics.jsonl", "eval.json", "COMPLETED")


def _rho(run: Path) -> float:
    return float(yaml.safe_load((run / "config.yaml").read_text())["optune"]["rho"])


def archive_run(run: Path, dest: Path, *, stores: bool) -> int:
    """One completed run into `dest` (replaced); returns the bytes written."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in KEEP:
        if (run / name).is_file():
            shutil.copy2(run / name, tmp / name)
    if (run / "eval").is_dir():
        shutil.copytree(run / "eval", tmp / "eval", ignore=shutil.ignore_patterns("*.tmp"))
    fork = run / "fork.json"
    if fork.is_file():
        data = json.loads(fork.read_text())
        source = Path(data["init_from"])
        if source.is_absolute():
            data["init_from"] = os.path.relpath(source, run)
        (tmp / "fork.json").write_text(json.dumps(data, indent=1) + "\n")
    if stores:
        for store in sorted((run / "checkpoints").glob("iter_*/rollouts.parquet")):
            if store.parent.name.endswith(".tmp"):
                continue
            (tmp / "checkpoints" / store.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy2(store, tmp / "checkpoints" / store.parent.name / store.name)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())


def archive(root: Path, dest: Path) -> dict:
    runs = sorted(p for group in ("base", "runs") for p in (root / group).glob("*") if (p / "config.yaml").is_file())
    done = [p for p in runs if (p / "COMPLETED").is_file()]
    total = 0
    for run in done:
        stores = run.parent.name == "base" or _rho(run) == 1.0
        total += archive_run(run, dest / run.parent.name / run.name, stores=stores)
    return {"archived": len(done), "unfinished": [str(p.relative_to(root)) for p in runs if p not in done],
            "bytes": total, "dest": str(dest)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="the experiment's root (base/ and runs/ below it)")
    ap.add_argument("dest", type=Path, help="the archive (the same layout)")
    args = ap.parse_args(argv)
    if not (args.root / "runs").is_dir():
        print(f"archive_runs: {args.root}: no runs/ directory (not an experiment root)", file=sys.stderr)
        return 2
    print(json.dumps(archive(args.root, args.dest)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
