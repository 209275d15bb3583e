"""Keep what a documented figure is rendered from: a run's metrics, evaluation and resolved config, with
the machine it ran on, under docs/data/ (scripts/render_docs.py turns them into the README's tables).

    python scripts/record_run.py EXP_DIR docs/data/default_run --wall-s 312.4 --command "make run"
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
from pathlib import Path

from optune_nemo.runtime.hardware import machine_info

FILES = ("metrics.jsonl", "eval.json", "config.yaml")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("exp_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--wall-s", type=float, required=True, help="wall-clock seconds of the whole command")
    ap.add_argument("--command", required=True, help="the command that produced the run")
    args = ap.parse_args(argv)
    if not (args.exp_dir / "COMPLETED").is_file():
        print(f"record_run: {args.exp_dir}: not a completed run (no COMPLETED)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if (args.exp_dir / name).is_file():
            shutil.copyfile(args.exp_dir / name, args.out / name)
    meta = {"command": args.command, "wall_s": round(args.wall_s, 1),
            "date": datetime.date.today().isoformat(), **machine_info()}
    (args.out / "run.json").write_text(json.dumps(meta, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
