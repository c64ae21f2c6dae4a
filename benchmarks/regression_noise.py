"""Seed-to-seed noise of the regression gate, its tolerances, and whether it sees a weakened model.

The gate (``regression/dvc.yaml``) trains the demo profile's model on a bundled subset of real MELD
conversations and compares its test figures with those of the base revision. This script re-runs the
gate's ``train`` and ``evaluate`` stages (the same ``python -m pipeline.train`` / ``pipeline.evaluate``
commands, run in ``regression/`` with the same path options, on the features and graphs of one
``dvc repro regression/dvc.yaml``) with a temporary params file derived from ``regression/params.yaml``:

* the unchanged model for each of ``--seeds`` (``train.seed``; default 0 1 2 3 4);
* two deliberately weakened models for each of ``--weak-seeds`` (default 0 1 2): ``context_off``
  (``model.context: none`` + ``model.graph: none``: no dialogue context at all) and ``hidden_8``
  (``model.hidden_size: 8``; ``num_heads`` stays 4, which divides 8).

For each tracked figure the tolerance is ``k`` times the sample standard deviation (ddof=1) of the
unchanged model over the seeds, rounded up to 3 decimals. Power check: every seed of the unchanged model
must lie within the tolerance of seed 0 (the committed run) in every figure, and every weakened run
must fall more than the tolerance below seed 0 in test emotion weighted F1.

    dvc repro regression/dvc.yaml                     # features and graphs (once)
    python benchmarks/regression_noise.py             # about 11 trainings; writes regression/noise.json

Runs go to a temporary folder (``--work`` to keep them); the table is printed and the figures written to
``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
REGRESSION = REPO / "regression"
FIGURES = (
    "test.emotion.weighted_f1",
    "test.emotion.accuracy",
    "test.emotion.macro_f1",
    "test.sentiment.weighted_f1",
    "test.sentiment.accuracy",
)
WEAKENED = {
    "context_off": {"model.context": "none", "model.graph": "none"},
    "hidden_8": {"model.hidden_size": 8},
}
# the gate's stage paths, relative to regression/ (as in regression/dvc.yaml)
PREPARED, FEATURES, GRAPHS = "prepared", "features", "graphs"
UPSTREAM = [
    f"{PREPARED}/utterances.csv",
    f"{PREPARED}/labels.json",
    f"{FEATURES}/text.safetensors",
    f"{FEATURES}/audio.safetensors",
    f"{FEATURES}/visual.safetensors",
    GRAPHS,
]


def lookup(metrics: dict, dotted: str) -> float:
    value = metrics
    for key in dotted.split("."):
        value = value[key]
    return float(value)


def with_overrides(raw: dict, overrides: dict) -> dict:
    raw = json.loads(json.dumps(raw))
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        raw.setdefault(section, {})[key] = value
    return raw


def tolerance(values: list[float], k: float) -> tuple[float, float, float]:
    """(mean, sample std, k * std rounded up to 3 decimals)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std, math.ceil(round(k * std * 1000, 6)) / 1000


def run_once(raw: dict, overrides: dict, seed: int, work: Path, name: str, threads: int | None = None) -> dict:
    """Train and evaluate one configuration with the gate's commands; returns its figures and times."""
    run_dir = work / f"{name}_seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    params_file = run_dir / "params.yaml"
    params_file.write_text(yaml.safe_dump(with_overrides(raw, {**overrides, "train.seed": seed}), sort_keys=False))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""),
    }
    env.setdefault("DGLBACKEND", "pytorch")
    env.setdefault("HF_HUB_OFFLINE", "1")
    if threads is not None:  # torch's intra-op threads (OpenMP)
        env["OMP_NUM_THREADS"] = str(threads)
    common = [
        "--params",
        str(params_file),
        "--prepared",
        PREPARED,
        "--features",
        FEATURES,
        "--graphs",
        GRAPHS,
        "--model",
        str(run_dir / "model.pt"),
    ]
    commands = {
        "train": [
            sys.executable,
            "-m",
            "pipeline.train",
            *common,
            "--metrics",
            str(run_dir / "metrics_train"),
            "--resume-dir",
            str(run_dir / "resume"),
        ],
        "evaluate": [
            sys.executable,
            "-m",
            "pipeline.evaluate",
            *common,
            "--metrics",
            str(run_dir / "metrics_eval"),
            "--predictions",
            str(run_dir / "predictions"),
        ],
    }
    seconds = {}
    for stage, command in commands.items():
        start = time.perf_counter()
        result = subprocess.run(command, cwd=REGRESSION, env=env, capture_output=True, text=True)
        seconds[stage] = round(time.perf_counter() - start, 1)
        (run_dir / f"{stage}.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            raise SystemExit(
                f"error: {name} seed {seed}: {stage} failed (exit {result.returncode}); "
                f"log: {run_dir / f'{stage}.log'}\n{result.stderr[-2000:]}"
            )
    metrics = json.loads((run_dir / "metrics_eval" / "metrics.json").read_text())
    train_metrics = json.loads((run_dir / "metrics_train" / "metrics.json").read_text())
    return {
        "seed": seed,
        **{f: lookup(metrics, f) for f in FIGURES},
        "best_epoch": train_metrics["best_epoch"],
        "best_dev_weighted_f1": train_metrics["best_dev_weighted_f1"],
        "epochs_run": int(train_metrics["step"]) + 1,
        "seconds": seconds,
    }


def row(name: str, r: dict) -> str:
    return (
        f"| {name} | {r['seed']} | {r['test.emotion.weighted_f1']:.4f} | {r['test.emotion.accuracy']:.4f} | "
        f"{r['test.emotion.macro_f1']:.4f} | {r['test.sentiment.weighted_f1']:.4f} | "
        f"{r['test.sentiment.accuracy']:.4f} | {r['best_dev_weighted_f1']:.4f} | {r['best_epoch']} | "
        f"{r['seconds']['train']:.0f} + {r['seconds']['evaluate']:.0f} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2, 3, 4],
        help="seeds of the unchanged model (the first is the reference, as committed)",
    )
    parser.add_argument("--weak-seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of each weakened model")
    parser.add_argument("--weakened", nargs="*", default=list(WEAKENED), choices=list(WEAKENED))
    parser.add_argument("--k", type=float, default=3.0, help="tolerance = k * sample std (default 3)")
    parser.add_argument("--params", type=Path, default=REGRESSION / "params.yaml")
    parser.add_argument("--out", type=Path, default=REGRESSION / "noise.json")
    parser.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of each run (OMP_NUM_THREADS; default: torch's own, as the gate). On a "
        "machine shared with other jobs, 1 avoids threads waiting for each other",
    )
    args = parser.parse_args(argv)
    if len(args.seeds) < 2:
        parser.error("--seeds needs at least two seeds for a standard deviation")
    missing = [p for p in UPSTREAM if not (REGRESSION / p).exists()]
    if missing:
        print(f"error: regression/{missing[0]} not found; run `dvc repro regression/dvc.yaml` first", file=sys.stderr)
        return 1
    sys.path.insert(0, str(REPO))
    from pipeline.config import load_params  # noqa: E402 (validates the params file)

    load_params(args.params)
    raw = yaml.safe_load(args.params.read_text(encoding="utf-8"))
    command = shlex.join(["python", "benchmarks/regression_noise.py", *(argv if argv is not None else sys.argv[1:])])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="regression_noise_") as tmp:
        work = (args.work or Path(tmp)).resolve()
        plan = [("unchanged", {}, s) for s in args.seeds] + [
            (name, WEAKENED[name], s) for name in args.weakened for s in args.weak_seeds
        ]
        runs: dict[str, list[dict]] = {}
        print(
            "| configuration | seed | emotion weighted F1 | emotion accuracy | emotion macro F1 | "
            "sentiment weighted F1 | sentiment accuracy | dev weighted F1 (selection) | best epoch | "
            "s (train + evaluate) |\n|---|---|---|---|---|---|---|---|---|---|",
            flush=True,
        )
        for name, overrides, seed in plan:
            result = run_once(raw, overrides, seed, work, name, args.threads)
            runs.setdefault(name, []).append(result)
            print(row(name, result), flush=True)

    unchanged = runs["unchanged"]
    reference = unchanged[0]
    # Does the reference run give the figures of the gate's own run (dvc repro regression/dvc.yaml)?
    gate_file = REGRESSION / "metrics" / "eval" / "metrics.json"
    gate_params = yaml.safe_load(args.params.read_text(encoding="utf-8"))
    reproduces = None
    if gate_file.exists() and reference["seed"] == gate_params.get("train", {}).get("seed", 0):
        gate = json.loads(gate_file.read_text(encoding="utf-8"))
        reproduces = all(lookup(gate, f) == reference[f] for f in FIGURES)
    figures = {}
    for f in FIGURES:
        values = [r[f] for r in unchanged]
        mean, std, tol = tolerance(values, args.k)
        figures[f] = {"values": values, "mean": mean, "std": std, "tolerance": tol}
    within = {f: max(abs(r[f] - reference[f]) for r in unchanged) <= figures[f]["tolerance"] for f in FIGURES}
    key = "test.emotion.weighted_f1"
    threshold = reference[key] - figures[key]["tolerance"]
    caught = {name: [r[key] < threshold for r in runs[name]] for name in args.weakened}
    power = {
        "reference_seed": reference["seed"],
        "reference_is_gate_run": None,
        "unchanged_within_tolerance": within,
        "unchanged_passes": all(within.values()),
        "weakened_threshold": {key: threshold},
        "weakened_caught": caught,
        "weakened_fails": all(all(v) for v in caught.values()),
    }

    print(f"\nk = {args.k:g}; tolerance = k * sample std (ddof=1) over seeds {args.seeds}, rounded up to 3 decimals\n")
    print(f"| figure | mean | std | tolerance | max abs(seed - seed {reference['seed']}) | unchanged within |")
    print("|---|---|---|---|---|---|")
    for f in FIGURES:
        spread = max(abs(r[f] - reference[f]) for r in unchanged)
        print(
            f"| {f} | {figures[f]['mean']:.4f} | {figures[f]['std']:.4f} | {figures[f]['tolerance']:.3f} | "
            f"{spread:.4f} | {'yes' if within[f] else 'NO'} |"
        )
    print(
        f"\nweakened models must score {key} < {reference[key]:.4f} - {figures[key]['tolerance']:.3f} "
        f"= {threshold:.4f}:"
    )
    for name in args.weakened:
        values = ", ".join(f"{r[key]:.4f}" for r in runs[name])
        verdict = "FAILS the gate (caught)" if all(caught[name]) else "NOT caught"
        print(f"  {name} ({WEAKENED[name]}): {values} -> {verdict}")
    power["reference_is_gate_run"] = reproduces
    if reproduces is not None:
        print(
            f"\nseed {reference['seed']} gives the figures of regression/metrics/eval/metrics.json exactly: "
            f"{'yes' if reproduces else 'NO'}"
        )
    print(
        f"\npower check: unchanged model passes: {power['unchanged_passes']}; "
        f"weakened models fail: {power['weakened_fails']}; total {time.perf_counter() - started:.0f} s"
    )

    result = {
        "measured": datetime.date.today().isoformat(),
        "command": command,
        "seeds": args.seeds,
        "k": args.k if args.k != int(args.k) else int(args.k),
        "figures": figures,
        "weakened": {
            name: {
                "overrides": WEAKENED[name],
                "seeds": args.weak_seeds,
                **{f: [r[f] for r in runs[name]] for f in FIGURES},
            }
            for name in args.weakened
        },
        "power_check": power,
        "runs": runs,
        "machine": f"{os.cpu_count()} CPU cores, torch on CPU",
        "threads": args.threads,
        "seconds": round(time.perf_counter() - started),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
