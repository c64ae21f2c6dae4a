"""A short readable summary of a run's tracked metrics, one figure per line (``dvc metrics show`` prints
one very wide table; it stays the full view).

Run: ``python scripts/summary.py [--eval metrics/eval/metrics.json] [--train metrics/train/metrics.json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def summary_lines(evaluation: dict, training: dict) -> list[str]:
    """The figures that matter, as ``name  value`` lines: test weighted F1 and accuracy per task (with the
    majority-class baseline), the best epoch and its dev weighted F1, the test size, which encoders are
    pretrained (a random one is named loudly) and the graph backend.

    Raises:
        KeyError: a metrics file without the fields the evaluate / train stages write.
    """
    lines = []
    for task in ("emotion", "sentiment"):
        m = evaluation["test"][task]
        chance = m.get("chance", {}).get("majority_weighted_f1")
        baseline = f"; majority class {chance:.3f}" if chance is not None else ""
        lines.append(f"test {task} weighted F1: {m['weighted_f1']:.3f} (accuracy {m['accuracy']:.3f}{baseline})")
    lines.append(f"test utterances: {evaluation['test_utterances']}")
    if training:
        lines.append(
            f"best epoch: {training['best_epoch']} (dev emotion weighted F1 {training['best_dev_weighted_f1']:.3f})"
        )
    pretrained = evaluation.get("encoders_pretrained", {})
    if pretrained:
        lines.append(
            "encoders: "
            + ", ".join(f"{m} {'pretrained' if p else 'RANDOMLY INITIALISED'}" for m, p in pretrained.items())
        )
    lines.append(f"graph backend: {evaluation.get('graph_backend', training.get('graph_backend', '?'))}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Print :func:`summary_lines` for the given metrics files; exit 1 with one line when one is missing."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval", type=Path, default=Path("metrics/eval/metrics.json"), help="evaluate's metrics")
    parser.add_argument("--train", type=Path, default=Path("metrics/train/metrics.json"), help="train's metrics")
    args = parser.parse_args(argv)
    try:
        evaluation = json.loads(args.eval.read_text(encoding="utf-8"))
        training = json.loads(args.train.read_text(encoding="utf-8")) if args.train.is_file() else {}
        lines = summary_lines(evaluation, training)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: cannot summarise {args.eval} / {args.train}: {err!r}; run `dvc repro` first", file=sys.stderr)
        return 1
    print("\n".join(lines))
    print("(all figures: dvc metrics show; compare runs: dvc metrics diff, dvc exp show)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
