"""benchmarks/quality.py end to end on a few dialogues of the bundled demo (MELD layout, text only), with
``data.emotions: null`` as the repository's params.yaml has it (the benchmark once crashed after the first
seed's training there: it scored with ``data.emotions`` as the class list instead of labels.json's)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "quality.py"
SPLITS = {"train": "train_sent_emo.csv", "dev": "dev_sent_emo.csv", "test": "test_sent_emo.csv"}
CONFIG = "full (adaptive, cross_attention, supcon)"


@pytest.fixture(scope="module")
def quality():
    """The benchmark script as a module (importing it runs nothing)."""
    spec = importlib.util.spec_from_file_location("quality_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def first_dialogues(csv_path: Path, n: int) -> tuple[int, list[str]]:
    """(utterances, dialogue ids) of the first ``n`` dialogues of a MELD split CSV, in file order."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    ids = list(dict.fromkeys(r["Dialogue_ID"] for r in rows))[:n]
    return sum(r["Dialogue_ID"] in ids for r in rows), ids


def test_meld_subset_keeps_the_first_dialogues_of_each_split(quality, demo_root: Path, tmp_path: Path):
    out = quality.meld_subset(demo_root, 2, tmp_path / "subset")
    for name in SPLITS.values():
        count, ids = first_dialogues(demo_root / name, 2)
        with open(out / name, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == count and list(dict.fromkeys(r["Dialogue_ID"] for r in rows)) == ids
        assert (out / name).read_bytes().split(b"\n", 1)[0].endswith(b"\r")  # CRLF, as the release
    assert not any(p.is_dir() for p in out.iterdir())  # CSVs only: every utterance text-only
    with pytest.raises(FileNotFoundError, match="dev_sent_emo.csv"):
        quality.meld_subset(tmp_path / "subset_without_dev", 1, tmp_path / "x")


def test_work_folder_refuses_outputs_of_other_data(quality, tmp_path: Path):
    quality.check_work(tmp_path, {"meld": "/m", "dialogues": 3})
    quality.check_work(tmp_path, {"meld": "/m", "dialogues": 3})  # same data: fine
    with pytest.raises(SystemExit, match="delete it or pass another --work"):
        quality.check_work(tmp_path, {"meld": "/m", "dialogues": None})


def test_quality_benchmark_runs_two_seeds_with_emotions_null(demo_root: Path, tmp_path: Path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    raw["data"]["emotions"] = None  # the committed default: classes come from the dataset (labels.json)
    raw["data"]["sentiments"] = None
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw), encoding="utf-8")
    out = tmp_path / "quality.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DGLBACKEND": "pytorch"}
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--meld",
            str(demo_root),
            "--dialogues",
            "3",
            "--params",
            str(params),
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(out),
            "--seeds",
            "0",
            "1",
            "--epochs",
            "2",
            "--patience",
            "1",
            "--configs",
            CONFIG,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text(encoding="utf-8"))
    expected = {split: first_dialogues(demo_root / name, 3)[0] for split, name in SPLITS.items()}
    assert results["dialogues"] == 3 and results["utterances"] == expected
    assert results["emotions"] == ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]
    assert results["seeds"] == [0, 1] and list(results["configs"]) == [CONFIG]
    runs = results["configs"][CONFIG]["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    for r in runs:
        assert 1 <= r["best_epoch"] <= r["epochs_run"] <= 2
        assert all(0 <= r[k] <= 1 for k in ("test_weighted_f1", "test_accuracy", "dev_weighted_f1"))
    mean, std = results["configs"][CONFIG]["mean_std"]["test_weighted_f1"]
    assert mean == pytest.approx(sum(r["test_weighted_f1"] for r in runs) / 2) and std >= 0
    baseline = results["baseline_logistic_regression"]
    assert 0 <= baseline["test_weighted_f1"] <= 1 and baseline["C"] in (0.1, 0.3, 1.0, 3.0, 10.0)
    assert results["peak_rss_mb"] > 0
    # the printed Markdown table (header, baseline row, one row per configuration; percent)
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| model | test weighted F1 |")
    assert table[1].startswith("| logistic regression (context-free, C=")
    assert table[2].startswith(f"| {CONFIG} | {100 * mean:.2f} ± {100 * std:.2f} |")
    assert "seeds [0, 1]" in result.stdout
