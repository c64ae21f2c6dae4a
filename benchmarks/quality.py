"""Quality benchmark on real conversations: MELD text-only, real pretrained MiniLM features.

Runs the pipeline's own stages (prepare, finetune_text, extract_text, extract_audio, extract_visual, build_graphs) on
MELD's CSVs without clips (every utterance text-only: audio and visual are masked), then trains the
model under several switches, each over several seeds, and reports test weighted F1 and accuracy at
the best-dev epoch (mean and std), beside a context-free logistic regression on the same features.

    python benchmarks/quality.py --meld ../shared/data/meld --seeds 0 1 2 3 4

Stage outputs are cached in ``--work`` (delete it to recompute); results go to ``--out`` (JSON) and a
Markdown table is printed. A quick run on a few dialogues (a smoke test, not a benchmark):

    python benchmarks/quality.py --dialogues 3 --seeds 0 1 --epochs 2 --configs "graph=none"

``--dialogues N`` copies the first N dialogues of each MELD split CSV into ``<work>/meld_subset`` and
runs on those; its default ``--work`` is a folder of its own. ``--work`` records which data its stage
outputs came from (``source.json``) and refuses to mix them with another ``--meld`` / ``--dialogues``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import build_graphs, extract_audio, extract_text, extract_visual, finetune_text, prepare  # noqa: E402
from pipeline.config import load_params, parse_params  # noqa: E402
from pipeline.data import load_dialogues  # noqa: E402
from pipeline.evaluate import classification_metrics  # noqa: E402
from pipeline.graphs import load_graphs  # noqa: E402
from pipeline.inference import build_model, run_model  # noqa: E402
from pipeline.train import train  # noqa: E402
from pipeline.utterances import LABELS_FILE, UTTERANCES_FILE, load_labels, load_utterances  # noqa: E402

# Stage outputs inside --work, laid out as dvc.yaml's vars lay them out in the repository.
PREPARED, FEATURES, GRAPHS = Path("data/prepared"), Path("data/features"), Path("data/graphs")
TEXT_ENCODER, FINETUNE_RESUME = Path("models/text_encoder"), Path("data/interim/finetune_text")
SOURCE_FILE = "source.json"  # in --work: the MELD folder and dialogue limit its stage outputs came from
MELD_CSVS = ("train_sent_emo.csv", "dev_sent_emo.csv", "test_sent_emo.csv")

# name -> params overrides (dotted keys). The first is the full model with the defaults of params.yaml.
CONFIGS = {
    "full (adaptive, cross_attention, supcon)": {},
    "graph=none": {"model.graph": "none"},
    "graph=gcn": {"model.graph": "gcn"},
    "contrastive=none": {"loss.contrastive": "none"},
    "contrastive=interclass": {"loss.contrastive": "interclass"},
    "sentiment_weight=0": {"loss.sentiment_weight": 0.0},
    "contrastive_queue=256": {"loss.contrastive_queue": 256},
    "lr_schedule=cosine": {"train.lr_schedule": "cosine"},
    "lr_schedule=plateau": {"train.lr_schedule": "plateau"},
}


def with_overrides(raw: dict, overrides: dict) -> dict:
    """A copy of the params mapping ``raw`` with ``{"section.key[.subkey]": value}`` set."""
    raw = json.loads(json.dumps(raw))
    for dotted, value in overrides.items():
        *path, key = dotted.split(".")
        node = raw
        for part in path:
            node = node.setdefault(part, {})
        node[key] = value
    return raw


def parse_set(items: list[str]) -> dict:
    """``--set text.context_window=2 ...`` as overrides (values read as YAML: numbers, booleans, lists)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --set {item!r}: expected section.key=value")
        out[key] = yaml.safe_load(value)
    return out


def encoder_classifier(splits, labels: dict, encoder_dir: Path) -> dict | None:
    """The fine-tuned encoder's own utterance classifier (``finetune_text``'s emotion head on the
    extracted text features: the same pooled vectors it was trained on), scored on test."""
    from safetensors.torch import load_file

    heads = encoder_dir / finetune_text.HEADS_FILE
    if not heads.is_file():
        return None
    weights = load_file(str(heads))
    features = torch.cat([d.features["text"] for d in splits["test"]])
    gold = torch.cat([d.emotion for d in splits["test"]]).numpy()
    pred = (features @ weights["emotion_head.weight"].T + weights["emotion_head.bias"]).argmax(-1).numpy()
    metrics = classification_metrics(gold, pred, labels["emotions"])
    return {"test_weighted_f1": metrics["weighted_f1"], "test_accuracy": metrics["accuracy"], "f1": metrics["f1"]}


def meld_subset(meld: Path, dialogues: int, out: Path) -> Path:
    """Copy the first ``dialogues`` dialogues (in file order) of each MELD split CSV into ``out``.

    Only the CSVs are copied, no clip folders: every utterance is text-only, as in the full benchmark.
    Rows are copied as the release has them (bytes that are not UTF-8, CRLF line ends), so ``prepare``
    sees what it would see in the full CSV.

    Returns:
        ``out``, a MELD release folder for ``data.root``.

    Raises:
        FileNotFoundError: a split CSV is missing from ``meld``. ValueError: a CSV has no
            ``Dialogue_ID`` column.
    """
    out.mkdir(parents=True, exist_ok=True)
    for name in MELD_CSVS:
        source = meld / name
        if not source.is_file():
            raise FileNotFoundError(f"{source}: not found; --meld must be a folder holding {', '.join(MELD_CSVS)}")
        text = source.read_bytes().decode("utf-8", errors="surrogateescape")
        rows = csv.reader(io.StringIO(text, newline=""))
        header = next(rows)
        if "Dialogue_ID" not in header:
            raise ValueError(f"{source}: no Dialogue_ID column; is it a MELD split CSV?")
        column, kept = header.index("Dialogue_ID"), []
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer, lineterminator="\r\n")
        writer.writerow(header)
        keep = False  # whether the current row's dialogue is one of the first ``dialogues``
        for row in rows:
            if len(row) > column:
                if row[column] not in kept and len(kept) < dialogues:
                    kept.append(row[column])
                keep = row[column] in kept
            if row and keep:  # a short row stays with its dialogue (prepare reports it)
                writer.writerow(row)
        (out / name).write_bytes(buffer.getvalue().encode("utf-8", errors="surrogateescape"))
    return out


def check_work(work: Path, source: dict) -> None:
    """Record in ``work`` which data its stage outputs come from; refuse outputs of other data.

    Raises:
        SystemExit: ``work`` holds stage outputs made from another MELD folder or dialogue limit.
    """
    work.mkdir(parents=True, exist_ok=True)
    path = work / SOURCE_FILE
    if path.exists():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        if recorded != source:
            raise SystemExit(
                f"error: {work} holds stage outputs of {recorded}, not of {source}; delete it or pass another --work"
            )
    path.write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")


def prepare_features(raw: dict, work: Path) -> dict[str, float]:
    """Run the pipeline's stages, as ``dvc.yaml`` runs them, on MELD text-only inside ``work`` (each
    skipped when its output is already there); returns the seconds of each stage that ran."""
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    params = parse_params(raw)
    table = {"utterances": PREPARED / UTTERANCES_FILE}
    steps = [
        (PREPARED / UTTERANCES_FILE, prepare.run, {"out": PREPARED}),
        (
            TEXT_ENCODER / finetune_text.INFO_FILE,
            finetune_text.run,
            {"prepared": PREPARED, "out": TEXT_ENCODER, "resume_dir": FINETUNE_RESUME},
        ),
        (FEATURES / "text.safetensors", extract_text.run, {**table, "text_encoder": TEXT_ENCODER, "out": FEATURES}),
        (FEATURES / "audio.safetensors", extract_audio.run, {**table, "out": FEATURES}),
        (FEATURES / "visual.safetensors", extract_visual.run, {**table, "out": FEATURES}),
        (GRAPHS / "graphs.safetensors", build_graphs.run, {**table, "out": GRAPHS}),
    ]
    seconds = {}
    for output, stage, paths in steps:
        if not output.exists():
            start = time.perf_counter()
            stage(params, **paths)
            seconds[stage.__module__] = round(time.perf_counter() - start, 1)
            print(f"{stage.__module__}: {seconds[stage.__module__]:.1f} s", flush=True)
    return seconds


def logistic_regression(splits) -> dict:
    """Context-free baseline: logistic regression on the text features, C chosen on dev weighted F1."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    def xy(split):
        return (
            torch.cat([d.features["text"] for d in splits[split]]).numpy(),
            torch.cat([d.emotion for d in splits[split]]).numpy(),
        )

    (x_train, y_train), (x_dev, y_dev), (x_test, y_test) = xy("train"), xy("dev"), xy("test")
    best = None
    for c in (0.1, 0.3, 1.0, 3.0, 10.0):
        clf = LogisticRegression(C=c, max_iter=2000).fit(x_train, y_train)
        f1 = f1_score(y_dev, clf.predict(x_dev), average="weighted")
        if best is None or f1 > best[0]:
            best = (f1, c, clf)
    pred = best[2].predict(x_test)
    return {
        "C": best[1],
        "dev_weighted_f1": best[0],
        "test_weighted_f1": float(f1_score(y_test, pred, average="weighted")),
        "test_accuracy": float((pred == y_test).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meld", type=Path, default=REPO.parent / "shared/data/meld", help="MELD's CSV folder")
    parser.add_argument(
        "--dialogues",
        type=int,
        default=None,
        help="use only the first N dialogues of each split (a quick run; default: all)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="stage outputs (default: benchmarks/work/meld_text, or meld_text_<N>dialogues with --dialogues)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/meld_text.json")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml", help="the params the runs start from")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--patience", type=int, default=6)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), help="subset of config names")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="params overrides for every run, features included (e.g. text.finetune.enabled=true "
        "text.context_window=2); give such runs their own --work",
    )
    args = parser.parse_args()
    unknown = [name for name in args.configs if name not in CONFIGS]
    if unknown:
        parser.error(f"unknown --configs {unknown}; known: {list(CONFIGS)}")
    if args.dialogues is not None and args.dialogues < 1:
        parser.error("--dialogues must be at least 1")
    if args.work is None:
        suffix = "" if args.dialogues is None else f"_{args.dialogues}dialogues"
        args.work = REPO / f"benchmarks/work/meld_text{suffix}"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if "OMP_NUM_THREADS" not in os.environ:  # else torch already follows it
        torch.set_num_threads(max(1, os.cpu_count() or 1))

    meld, work = args.meld.resolve(), args.work.resolve()
    overrides = parse_set(args.set)
    check_work(work, {"meld": str(meld), "dialogues": args.dialogues, **({"set": overrides} if overrides else {})})
    root = meld if args.dialogues is None else meld_subset(meld, args.dialogues, work / "meld_subset")
    base = load_params(args.params.resolve()).model_dump(mode="json")
    base = with_overrides(
        base,
        {
            "data.root": str(root),
            "data.missing_clip": "text_only",
            "train.epochs": args.epochs,
            "train.patience": args.patience,
            **overrides,
        },
    )
    args.out = args.out.resolve()
    stage_seconds = prepare_features(base, work)
    labels = load_labels(PREPARED / LABELS_FILE)
    graphs, num_relations = load_graphs(GRAPHS)
    splits, encoders = load_dialogues(
        labels["emotions"], labels["sentiments"], load_utterances(PREPARED / UTTERANCES_FILE), FEATURES, graphs
    )
    print({s: (len(d), sum(len(x) for x in d)) for s, d in splits.items()}, encoders["text"]["model"], flush=True)

    results = {
        "baseline_logistic_regression": logistic_regression(splits),
        "configs": {},
        "features": encoders["text"],
        "seeds": args.seeds,
        "dialogues": args.dialogues,  # per split; None: all
        "utterances": {split: sum(len(d) for d in dialogues) for split, dialogues in splits.items()},
        "emotions": labels["emotions"],  # the classes scored, in output order (labels.json, not data.emotions)
        "set": overrides,
        "stage_seconds": stage_seconds,  # of the stages that ran in this invocation
        "encoder_classifier": encoder_classifier(splits, labels, TEXT_ENCODER),
    }
    info_file = TEXT_ENCODER / finetune_text.INFO_FILE
    finetuned = json.loads(info_file.read_text(encoding="utf-8")) if info_file.is_file() else {}
    if finetuned.get("enabled"):
        results["finetune"] = {k: finetuned[k] for k in ("epochs", "best_epoch")}
        if "pipeline.finetune_text" in stage_seconds:
            minutes = stage_seconds["pipeline.finetune_text"] / 60 / len(finetuned["epochs"])
            results["finetune"]["minutes_per_epoch"] = round(minutes, 2)  # incl. the dev pass of each epoch
    print("logistic regression:", results["baseline_logistic_regression"], flush=True)
    for name in args.configs:
        runs = []
        for seed in args.seeds:
            p = parse_params(with_overrides(base, {**CONFIGS[name], "train.seed": seed}))
            start = time.perf_counter()
            checkpoint = train(p, splits, num_relations, labels)
            seconds = time.perf_counter() - start
            out = run_model(build_model(checkpoint), splits["test"], p, torch.device("cpu"))
            metrics = classification_metrics(
                out["emotion"].numpy(), out["emotion_prob"].argmax(-1).numpy(), labels["emotions"]
            )  # the classes prepare wrote, in output order
            runs.append(
                {
                    "seed": seed,
                    "test_weighted_f1": metrics["weighted_f1"],
                    "test_accuracy": metrics["accuracy"],
                    "test_f1": metrics["f1"],
                    "dev_weighted_f1": checkpoint["best_dev_weighted_f1"],
                    "best_epoch": checkpoint["best_epoch"],
                    "epochs_run": checkpoint["epochs_run"],
                    "seconds_per_epoch": seconds / checkpoint["epochs_run"],
                }
            )
            print(name, runs[-1], flush=True)
        summary = {
            k: (float(np.mean([r[k] for r in runs])), float(np.std([r[k] for r in runs])))
            for k in ("test_weighted_f1", "test_accuracy", "dev_weighted_f1", "seconds_per_epoch")
        }
        summary["test_f1"] = {
            c: (float(np.mean([r["test_f1"][c] for r in runs])), float(np.std([r["test_f1"][c] for r in runs])))
            for c in labels["emotions"]
        }
        results["configs"][name] = {"overrides": CONFIGS[name], "runs": runs, "mean_std": summary}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    args.out.write_text(json.dumps(results, indent=2))

    lr = results["baseline_logistic_regression"]
    print("\n| model | test weighted F1 | test accuracy | dev weighted F1 | s/epoch |\n|---|---|---|---|---|")
    print(
        f"| logistic regression (context-free, C={lr['C']}) | {100 * lr['test_weighted_f1']:.2f} | "
        f"{100 * lr['test_accuracy']:.2f} | {100 * lr['dev_weighted_f1']:.2f} | - |"
    )
    for name, r in results["configs"].items():
        m = r["mean_std"]
        print(
            f"| {name} | {100 * m['test_weighted_f1'][0]:.2f} ± {100 * m['test_weighted_f1'][1]:.2f} | "
            f"{100 * m['test_accuracy'][0]:.2f} ± {100 * m['test_accuracy'][1]:.2f} | "
            f"{100 * m['dev_weighted_f1'][0]:.2f} ± {100 * m['dev_weighted_f1'][1]:.2f} "
            f"| {m['seconds_per_epoch'][0]:.1f} |"
        )
    own = results["encoder_classifier"]
    if own is not None:
        print(
            f"| fine-tuned encoder's own utterance classifier | {100 * own['test_weighted_f1']:.2f} | "
            f"{100 * own['test_accuracy']:.2f} | - | - |"
        )
    print("\nper-class test F1 (mean over seeds):")
    for name, r in results["configs"].items():
        per_class = ", ".join(f"{c} {100 * m:.1f}" for c, (m, _) in r["mean_std"]["test_f1"].items())
        print(f"- {name}: {per_class}")
    if own is not None:
        print("- encoder's own classifier: " + ", ".join(f"{c} {100 * v:.1f}" for c, v in own["f1"].items()))
    if "finetune" in results:
        print(f"fine-tuning: {results['finetune']}")
    print(f"\npeak RSS {results['peak_rss_mb']:.0f} MB; seeds {args.seeds}")


if __name__ == "__main__":
    main()
