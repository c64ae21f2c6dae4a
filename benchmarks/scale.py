"""Scale-out figures: extraction utterances/s with 1 and 2 workers per backend, training s/epoch with 1
and 2 processes, and the per-utterance costs a plan for a large corpus is built from.

Every figure comes from the pipeline's own stage commands, run as subprocesses with the runtime set
through the environment (``ERC_RUNTIME_BACKEND``, ``ERC_RUNTIME_WORKERS``), exactly as a user runs
them; the same inputs for every configuration, a cold resume cache for each run (its own folder), and
the sha256 of each output printed beside its time (the outputs must not depend on the backend).

* extraction: ``extract_text`` (the real all-MiniLM-L6-v2) on ``--text-utterances`` utterances of
  MELD's train CSV (``--meld``; the demo's texts repeated when it is absent), ``extract_audio`` and
  ``extract_visual`` on the demo's 115 clips (the demo's random wav2vec2 and face embedder);
* training: ``train`` for ``--epochs`` epochs on MELD's text-only features
  (``benchmarks/work/meld_text``, made by ``quality.py``) with 1 and 2 processes (torchrun, gloo).

Extraction runs with ``runtime.threads: 1`` (one torch thread per worker, so that 2 workers use the
cores that 1 worker leaves idle; every worker computes with the driver's thread count), plus a local
run with torch's default thread count for reference. Peak RSS: the largest ``ru_maxrss`` of the
stage's processes and the children they waited for (torchrun's ranks; not Ray's actors, which the
Ray cluster starts).

Usage: ``python benchmarks/scale.py --out benchmarks/results/scale.json`` (about 10 minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# (backend, workers, runtime.threads): one thread per worker, so that 2 workers use the 2 cores one
# worker leaves idle; and the local run with torch's default thread count (one per core) for reference.
CONFIGS = [("local", 1, 1), ("torchrun", 2, 1), ("ray", 2, 1), ("local", 1, None)]


def run_stage(args: list[str], cwd: Path, backend: str, workers: int) -> tuple[float, float, str]:
    """Run ``python -m <args>`` with the runtime in the environment: (wall seconds, peak RSS MB of its
    processes, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "DGLBACKEND": "pytorch", "HF_HUB_OFFLINE": "1"}
    env.update({"ERC_RUNTIME_BACKEND": backend, "ERC_RUNTIME_WORKERS": str(workers), "RAY_DEDUP_LOGS": "0"})
    probe = (
        "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
        "print('MAXRSS', max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, 0), file=sys.stderr); "
        "sys.exit(p.returncode)"
    )
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", probe, sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{args[0]} ({backend} x {workers}) failed:\n{proc.stderr[-4000:]}")
    rss = int(re.findall(r"MAXRSS (\d+)", proc.stderr)[-1]) / 1024
    return seconds, rss, proc.stderr


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def stage_seconds(stderr: str) -> float:
    """The stage's own time (``stage finished in X s``: without the interpreter's start-up)."""
    return float(re.findall(r"stage finished in ([\d.]+) s", stderr)[-1])


def text_table(work: Path, meld: Path | None, n: int) -> Path:
    """An utterance table of ``n`` utterances: MELD's train texts, or the demo's repeated."""
    from pipeline.utterances import load_utterances, write_utterances

    demo = load_utterances(REPO / "data/prepared/utterances.csv")
    if meld is not None and (meld / "train_sent_emo.csv").is_file():
        with open(meld / "train_sent_emo.csv", encoding="utf-8") as f:
            texts = [row["Utterance"] for row in csv.DictReader(f)]
    else:
        texts = [u.text for u in demo]
    template = demo[0]
    rows = [
        template.__class__(
            f"train/dia{i // 10}_utt{i % 10}",
            "train",
            f"train/{i // 10}",
            i % 10,
            "AB"[i % 2],
            texts[i % len(texts)],
            "",
            "",
        )
        for i in range(n)
    ]
    path = work / f"text_{n}.csv"
    write_utterances(rows, path)
    return path


def demo_table(work: Path) -> Path:
    """The demo's utterance table with absolute media paths (the stages run in their own folders)."""
    from dataclasses import replace

    from pipeline.utterances import load_utterances, write_utterances

    rows = [
        replace(u, clip=str((REPO / u.clip).resolve()) if u.clip else u.clip)
        for u in load_utterances(REPO / "data/prepared/utterances.csv")
    ]
    path = work / "demo.csv"
    write_utterances(rows, path)
    return path


def extraction(work: Path, meld: Path | None, text_utterances: int) -> list[dict]:
    tables = {"text": text_table(work, meld, text_utterances), "audio": demo_table(work)}
    tables["visual"] = tables["audio"]
    out = []
    for modality in ("text", "audio", "visual"):
        n = sum(1 for _ in open(tables[modality], encoding="utf-8")) - 1
        for backend, workers, threads in CONFIGS:
            run_dir = work / f"{modality}_{backend}_{workers}_{threads}"
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            raw = yaml.safe_load((REPO / "params.yaml").read_text())
            raw.setdefault("runtime", {})["threads"] = threads
            (run_dir / "params.yaml").write_text(yaml.safe_dump(raw))
            args = [f"pipeline.extract_{modality}", "--utterances", str(tables[modality]), "--out", str(run_dir / "f")]
            if modality == "text":
                args += ["--text-encoder", "none"]
            wall, rss, stderr = run_stage(args, run_dir, backend, workers)
            seconds = stage_seconds(stderr)
            row = {
                "modality": modality,
                "backend": backend,
                "workers": workers,
                "threads": threads,
                "utterances": n,
                "wall_seconds": round(wall, 1),
                "stage_seconds": seconds,
                "utterances_per_second": round(n / seconds, 1),
                "peak_rss_mb": round(rss),
                "sha256": sha(run_dir / "f" / f"{modality}.safetensors"),
            }
            print(json.dumps(row), flush=True)
            out.append(row)
    return out


def training(work: Path, features: Path, epochs: int) -> list[dict]:
    if not (features / "data/features/text.safetensors").is_file():
        print(f"no MELD features in {features} (run benchmarks/quality.py first): training skipped", flush=True)
        return []
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"].update({"epochs": epochs, "patience": None})
    raw["model"]["dropout"] = 0.0
    raw.setdefault("runtime", {})["threads"] = 1  # one thread per process: 2 processes on 2 cores
    out = []
    for workers in (1, 2):
        run_dir = work / f"train_{workers}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        (run_dir / "params.yaml").write_text(yaml.safe_dump(raw))
        data = features / "data"
        args = ["pipeline.train", "--prepared", str(data / "prepared"), "--features", str(data / "features")]
        args += ["--graphs", str(data / "graphs"), "--model", str(run_dir / "model.pt")]
        args += ["--metrics", str(run_dir / "metrics"), "--resume-dir", str(run_dir / "resume")]
        wall, rss, stderr = run_stage(args, run_dir, "local", workers)
        per_epoch = [float(s) for s in re.findall(r"epoch +\d+ .*\(([\d.]+) s\)", stderr)]
        summary = json.loads((run_dir / "metrics/metrics.json").read_text())
        row = {
            "processes": workers,
            "epochs": len(per_epoch),
            "seconds_per_epoch": round(sum(per_epoch) / len(per_epoch), 2),
            "seconds_per_epoch_each": per_epoch,
            "wall_seconds": round(wall, 1),
            "peak_rss_mb_per_process": round(rss),
            "train_loss_last": summary["train"]["loss"],
            "dev_weighted_f1_last": summary["dev"]["weighted_f1"],
        }
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--meld", type=Path, default=REPO.parent / "shared/data/meld")
    parser.add_argument("--text-utterances", type=int, default=2000)
    parser.add_argument("--meld-features", type=Path, default=REPO / "benchmarks/work/meld_text")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks/work/scale")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/scale.json")
    parser.add_argument("--skip", nargs="*", default=[], choices=["extraction", "training"])
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count()}
    if "extraction" not in args.skip:
        result["extraction"] = extraction(args.work, args.meld if args.meld.is_dir() else None, args.text_utterances)
    if "training" not in args.skip:
        result["training"] = training(args.work, args.meld_features, args.epochs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
