"""The two CI checks: reproducibility (a fresh run gives the committed metrics) and the regression gate.

``python -m pipeline.regression reproduce [--tolerance 0]``
    After ``dvc repro`` (and ``dvc repro regression/dvc.yaml``): every metrics file that git tracks
    must hold, in the workspace, the figures committed at ``HEAD``. Training and extraction are
    deterministic on the CPU, so the default tolerance is 0 (exact); on a GPU pass the tolerance you
    accept (``--tolerance 0.05``): each float figure may then differ by that much, and integer counts
    (the best epoch, steps) are not compared. This proves the committed figures come from the committed code; it
    cannot see a regression that was committed together with its lower figures.

``python -m pipeline.regression gate [--base REV]``
    The figures committed at ``HEAD`` against those of a base revision, on the regression subset
    (:data:`GATE_METRICS`: real MELD conversations where the model scores well below 1.0). The base is
    the pull request's base branch on GitHub (``--base origin/main``), and by default the parent of
    the latest commit that changed the subset's metrics. A figure fails when it drops by more than
    its tolerance, which is ``k`` times its seed-to-seed standard deviation as measured by
    ``benchmarks/regression_noise.py`` (:data:`NOISE`). A deliberate drop passes only through a
    record in :data:`ACCEPTED` (which figure, which commit, why); the gate prints the records it used.

Exit status 1 on a failure, with what failed and ``dvc metrics diff`` beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import yaml

GATE_METRICS = Path("regression/metrics/eval/metrics.json")
NOISE = Path("regression/noise.json")
ACCEPTED = Path("regression/accepted_drops.yaml")
# Figures whose drop is a regression (higher is better).
TRACKED = (
    "test.emotion.weighted_f1",
    "test.emotion.accuracy",
    "test.emotion.macro_f1",
    "test.sentiment.weighted_f1",
    "test.sentiment.accuracy",
)


class CheckError(RuntimeError):
    """The check cannot run (not a git repository, an unknown revision, a missing or invalid file)."""


def lookup(metrics: dict, dotted: str) -> float | None:
    """``metrics["a"]["b"]`` for ``"a.b"``; None when a key is missing."""
    value = metrics
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value)


def numeric_leaves(obj, prefix: str = "") -> dict[str, float | str | bool | None]:
    """Every leaf of a nested dict as ``{"a.b.c": value}``."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            out.update(numeric_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: obj}


def compare(
    base: dict, head: dict, tolerances: dict[str, float] | float, tracked: tuple[str, ...] = TRACKED
) -> list[str]:
    """Describe every tracked figure that dropped from ``base`` to ``head`` by more than its tolerance,
    or disappeared.

    Args:
        tolerances: per figure (a figure without one gets 0), or one value for all.

    Returns:
        one line per problem; empty when ``head`` is within tolerance.
    """
    problems = []
    for key in tracked:
        old, new = lookup(base, key), lookup(head, key)
        tolerance = tolerances if isinstance(tolerances, (int, float)) else tolerances.get(key, 0.0)
        if old is None:
            continue
        if new is None:
            problems.append(f"{key}: missing from the new metrics (was {old:.4f})")
        elif new < old - tolerance - 1e-12:
            problems.append(f"{key}: {new:.4f} < {old:.4f} - tolerance {tolerance:.3f} (change {new - old:+.4f})")
    return problems


def git(*args: str) -> str:
    """Run git; its stdout. Raises CheckError with git's message on failure."""
    result = subprocess.run(["git", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise CheckError(f"git {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def metrics_at(rev: str, path: Path) -> dict | None:
    """The JSON file ``path`` as committed at ``rev``; None when that revision has no such file."""
    result = subprocess.run(["git", "show", f"{rev}:{path.as_posix()}"], capture_output=True, text=True)
    if result.returncode != 0:
        git("rev-parse", "--verify", f"{rev}^{{commit}}")  # an unknown revision is an error, a missing file not
        return None
    return json.loads(result.stdout)


def default_base(path: Path = GATE_METRICS) -> str | None:
    """The parent of the latest commit that changed ``path`` (None when that commit has no parent)."""
    latest = git("log", "-n", "1", "--format=%H", "--", path.as_posix()).strip()
    if not latest:
        raise CheckError(f"{path}: no commit holds it yet; commit the regression subset's metrics first")
    parents = git("rev-list", "--parents", "-n", "1", latest).split()[1:]
    return parents[0] if parents else None


def tolerances(path: Path = NOISE) -> dict[str, float]:
    """Per-figure tolerances from the noise measurement (``benchmarks/regression_noise.py``)."""
    try:
        noise = json.loads(path.read_text(encoding="utf-8"))
        return {figure: float(entry["tolerance"]) for figure, entry in noise["figures"].items()}
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise CheckError(f"{path}: cannot read the tolerances ({err}); run benchmarks/regression_noise.py") from None


def accepted_records(path: Path = ACCEPTED) -> list[dict]:
    """The deliberate drops kept in the repository: ``[{figure, commit, reason}, ...]``.

    Raises:
        CheckError: the file is not a YAML list of such records.
    """
    if not path.exists():
        return []
    try:
        records = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    except yaml.YAMLError as err:
        raise CheckError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(records, list) or not all(
        isinstance(r, dict) and {"figure", "commit", "reason"} <= set(r) and str(r["reason"]).strip() for r in records
    ):
        raise CheckError(f"{path}: expected a list of {{figure, commit, reason}} records with a non-empty reason")
    return records


def dvc_metrics_diff(rev: str) -> str:
    """``dvc metrics diff <rev> --md`` (empty when nothing differs or dvc fails)."""
    diff = subprocess.run(
        [sys.executable, "-m", "dvc", "metrics", "diff", rev, "--md"], capture_output=True, text=True
    ).stdout
    return diff if len([line for line in diff.splitlines() if line.startswith("|")]) > 2 else ""


def reproduce(tolerance: float) -> int:
    """The reproducibility check (see the module docstring). Returns the exit status."""
    files = [Path(p) for p in git("ls-files", "*metrics.json").split()]
    if not files:
        raise CheckError("no metrics.json file is tracked by git")
    problems = []
    for path in files:
        if not path.exists():
            problems.append(
                f"{path}: missing from the workspace; run `dvc repro` (and `dvc repro {path.parts[0]}/dvc.yaml`)"
            )
            continue
        committed = numeric_leaves(metrics_at("HEAD", path) or {})
        fresh = numeric_leaves(json.loads(path.read_text(encoding="utf-8")))
        for key in sorted(set(committed) | set(fresh)):
            old, new = committed.get(key), fresh.get(key)
            numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (old, new))
            if numbers and (math.isclose(old, new, rel_tol=0, abs_tol=tolerance) or old == new):
                continue
            if numbers and tolerance > 0 and isinstance(old, int) and isinstance(new, int):
                continue  # counts (best epoch, steps) may move on a GPU; the figures above are compared
            if old != new:
                problems.append(f"{path}: {key}: committed {old!r}, fresh run {new!r}")
    modified = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    exact = "exactly" if tolerance == 0 else f"within {tolerance}"
    if problems:
        print(
            f"NOT REPRODUCED: the fresh run's metrics differ from those committed at HEAD ({exact}):\n  "
            + "\n  ".join(problems)
        )
        print(f"\n`dvc metrics diff HEAD`:\n{dvc_metrics_diff('HEAD') or '(no numeric differences)'}")
        return 1
    print(f"reproduced: {len(files)} metrics files match HEAD {exact} ({', '.join(map(str, files))})")
    if modified:
        print("tracked files that differ from HEAD after the run: " + ", ".join(modified))
    return 0


def gate(base: str | None) -> int:
    """The regression gate (see the module docstring). Returns the exit status."""
    base = base or default_base()
    head_metrics = metrics_at("HEAD", GATE_METRICS)
    if head_metrics is None:
        raise CheckError(f"{GATE_METRICS} is not committed at HEAD; run `dvc repro regression/dvc.yaml` and commit it")
    base_metrics = metrics_at(base, GATE_METRICS) if base else None
    if base_metrics is None:
        print(f"gate: no earlier {GATE_METRICS} (base {base or 'none'}); nothing to compare: pass")
        return 0
    limits = tolerances()
    base_name = git("rev-parse", "--short", base).strip()
    print(f"gate: {GATE_METRICS} at HEAD against {base_name} (tolerances from {NOISE}: k x seed-to-seed std)")
    print(f"  {'figure':28} {'base':>8} {'HEAD':>8} {'change':>8} {'tolerance':>9}")
    for key in TRACKED:
        old, new = lookup(base_metrics, key), lookup(head_metrics, key)
        if old is not None and new is not None:
            print(f"  {key:28} {old:8.4f} {new:8.4f} {new - old:+8.4f} {limits.get(key, 0.0):9.3f}")
    problems = compare(base_metrics, head_metrics, limits)
    commits = git("rev-list", f"{base}..HEAD").split()
    records = accepted_records()
    failing, used = [], []
    for problem in problems:
        figure = problem.split(":")[0]
        match = [r for r in records if r["figure"] == figure and any(c.startswith(str(r["commit"])) for c in commits)]
        (used if match else failing).append((problem, match))
    for problem, match in used:
        for r in match:
            print(f"ACCEPTED drop ({ACCEPTED}): {problem}\n  commit {r['commit']}: {r['reason']}")
    if failing:
        latest = git("log", "-n", "1", "--format=%h", "--", GATE_METRICS.as_posix()).strip()
        print(f"REGRESSION against {base_name}:\n  " + "\n  ".join(p for p, _ in failing))
        print(f"\n`dvc metrics diff {base_name}`:\n{dvc_metrics_diff(base) or '(no numeric differences)'}")
        print(
            f"If the drop is deliberate, record it in {ACCEPTED} and commit that:\n"
            + "".join(f"- figure: {p.split(':')[0]}\n  commit: {latest}\n  reason: <why>\n" for p, _ in failing)
        )
        return 1
    print(f"no regression against {base_name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    rep = commands.add_parser("reproduce", help="the workspace's metrics (after dvc repro) equal HEAD's")
    rep.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="largest accepted difference of each figure (default 0: exact, for the CPU)",
    )
    gat = commands.add_parser("gate", help="HEAD's regression-subset figures against a base revision's")
    gat.add_argument(
        "--base", help=f"base revision (default: the parent of the latest commit that changed {GATE_METRICS})"
    )
    args = parser.parse_args(argv)
    try:
        return reproduce(args.tolerance) if args.command == "reproduce" else gate(args.base)
    except (CheckError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
