"""scripts/summary.py: the short summary that demo.sh prints instead of the wide ``dvc metrics show`` table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("summary", REPO / "scripts" / "summary.py")
summary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(summary)

EVAL = {
    "test": {
        "emotion": {"accuracy": 0.61, "weighted_f1": 0.5874, "chance": {"majority_weighted_f1": 0.31}},
        "sentiment": {"accuracy": 0.7, "weighted_f1": 0.69},
    },
    "test_utterances": 2610,
    "encoders_pretrained": {"text": True, "audio": False},
    "graph_backend": "torch",
}
TRAIN = {"best_epoch": 7, "best_dev_weighted_f1": 0.6012}


def test_summary_gives_one_short_line_per_figure(tmp_path: Path, capsys):
    (tmp_path / "eval.json").write_text(json.dumps(EVAL), encoding="utf-8")
    (tmp_path / "train.json").write_text(json.dumps(TRAIN), encoding="utf-8")
    assert summary.main(["--eval", str(tmp_path / "eval.json"), "--train", str(tmp_path / "train.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) < 100
    assert "test emotion weighted F1: 0.587 (accuracy 0.610; majority class 0.310)" in lines
    assert "test sentiment weighted F1: 0.690 (accuracy 0.700)" in lines
    assert "best epoch: 7 (dev emotion weighted F1 0.601)" in lines
    assert "encoders: text pretrained, audio RANDOMLY INITIALISED" in lines
    assert "test utterances: 2610" in lines and "graph backend: torch" in lines


def test_summary_without_metrics_says_what_to_run(tmp_path: Path, capsys):
    assert summary.main(["--eval", str(tmp_path / "none.json")]) == 1
    assert "run `dvc repro` first" in capsys.readouterr().err
