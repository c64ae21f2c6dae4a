"""Regression check: the metrics of a fresh run must match the metrics committed at a git revision.

CI runs ``dvc repro`` on the demo and then this check against ``HEAD`` (the committed ``dvc.lock`` and
``metrics/eval/metrics.json``): a drop of a tracked figure by more than ``--tolerance`` fails, and the
output shows ``dvc metrics diff`` so the reader sees every figure that moved. Training is
deterministic on the CPU, so on the machine that produced the committed figures they reproduce exactly;
the tolerance absorbs floating-point differences between CPUs.

Run: ``python -m pipeline.regression [--rev HEAD] [--tolerance 0.02]`` (exit status 1 on a regression).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

METRICS = Path("metrics/eval/metrics.json")
# Figures whose drop is a regression (higher is better).
TRACKED = ("test.emotion.weighted_f1", "test.emotion.accuracy", "test.emotion.macro_f1",
           "test.sentiment.weighted_f1", "test.sentiment.accuracy")


def lookup(metrics: dict, dotted: str) -> float | None:
    """``metrics["a"]["b"]`` for ``"a.b"``; None when a key is missing."""
    value = metrics
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value)


def compare(committed: dict, fresh: dict, tolerance: float, tracked: tuple[str, ...] = TRACKED) -> list[str]:
    """Describe every tracked figure that dropped by more than ``tolerance`` or disappeared.

    Returns:
        one line per problem; empty when the fresh run is within tolerance.
    """
    problems = []
    for key in tracked:
        old, new = lookup(committed, key), lookup(fresh, key)
        if old is None:
            continue
        if new is None:
            problems.append(f"{key}: missing from the fresh metrics (committed {old:.4f})")
        elif new < old - tolerance:
            problems.append(f"{key}: {new:.4f} < committed {old:.4f} - tolerance {tolerance}")
    return problems


def committed_metrics(rev: str, path: Path = METRICS) -> dict:
    """The metrics file as committed at ``rev``.

    Raises:
        FileNotFoundError: the revision has no such file (or this is not a git repository).
    """
    result = subprocess.run(["git", "show", f"{rev}:{path.as_posix()}"], capture_output=True, text=True)
    if result.returncode != 0:
        raise FileNotFoundError(f"{path} at {rev}: {result.stderr.strip()}")
    return json.loads(result.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fail when the fresh metrics regress against a git revision.")
    parser.add_argument("--rev", default="HEAD", help="git revision holding the reference metrics (default HEAD)")
    parser.add_argument("--tolerance", type=float, default=0.02, help="allowed drop of each figure (default 0.02)")
    args = parser.parse_args(argv)
    if not METRICS.exists():
        print(f"error: {METRICS} not found; run `dvc repro` first", file=sys.stderr)
        return 1
    try:
        problems = compare(committed_metrics(args.rev), json.loads(METRICS.read_text()), args.tolerance)
    except (FileNotFoundError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    diff = subprocess.run([sys.executable, "-m", "dvc", "metrics", "diff", args.rev, "--md"],
                          capture_output=True, text=True).stdout
    if len([line for line in diff.splitlines() if line.startswith("|")]) <= 2:  # a header-only table
        diff = ""
    if problems:
        print(f"REGRESSION against {args.rev} (tolerance {args.tolerance}):\n  " + "\n  ".join(problems))
        print(f"\n`dvc metrics diff {args.rev}`:\n{diff or '(no differences)'}")
        return 1
    print(f"no regression against {args.rev} (tolerance {args.tolerance}); `dvc metrics diff {args.rev}`:\n"
          f"{diff or '(no differences)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
