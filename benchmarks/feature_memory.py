"""Feature memory of train / evaluate: the mapped feature reader against whole-file loading.

``load_dialogues`` maps the feature files (:func:`pipeline.feature_table.open_table`) and each dialogue
reads its rows when a batch needs them; before, it loaded every file (:func:`load_table`) and kept a
copy of every dialogue's rows, so the process held all features. This benchmark writes a synthetic
corpus (``--utterances`` rows, ``--dims`` per modality, float32; dialogues of 1 to 24 utterances, mean
about 9.6, 1 to 4 speakers, a tenth of the rows masked per modality) into ``--work``, then, for each
variant, in a fresh child process:

1. imports the pipeline and builds the utterances and graphs (not measured);
2. resets the peak RSS (``/proc/self/clear_refs``; Linux >= 4.0) and times ``load_dialogues``;
3. times one pass over all batches as training makes them (``batches(..., shuffle=True)``,
   ``--batch-dialogues`` dialogues each, every batch's features read);
4. reports the peak RSS of steps 2-3 (``VmHWM``) and, sampled every 5 ms, the peak of its
   process-memory part (``RssAnon``: heap, what the process cannot give back) and of its
   file-backed part (``RssFile``: pages of mapped files, which the kernel drops under memory pressure
   and reads again when needed), all in MB above the value before step 2.

Variants: ``mapped`` (``pipeline.data.load_dialogues`` now); ``whole`` (the previous
``load_dialogues``, reproduced below: ``load_table`` for each modality, a copy of each dialogue's rows).
The feature files were just written, so they are in the page cache: the seconds are those of a warm
cache (a cold read adds the disk's time to both variants' first touch of a row).

    python benchmarks/feature_memory.py --utterances 100000 --dims text=1024 visual=512 audio=768
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DGLBACKEND", "pytorch")

MAX_LENGTH, MEAN_LENGTH = 24, 9.6  # MELD-like dialogue lengths (benchmarks/graph_backend.py)
EMOTIONS, SENTIMENTS = ["neutral", "joy", "sadness", "anger"], ["negative", "neutral", "positive"]
VARIANTS = ("mapped", "whole")


def status_mb(key: str) -> float:
    """A ``/proc/self/status`` field (``VmRSS``, ``VmHWM``, ``RssAnon``, ``RssFile``) in MB."""
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


class Sampler(threading.Thread):
    """Largest ``RssAnon`` and ``RssFile`` seen every ``interval`` seconds until :meth:`stop`."""

    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        self.interval, self.peak, self._stop_event = interval, {"RssAnon": 0.0, "RssFile": 0.0}, threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            for key in self.peak:
                self.peak[key] = max(self.peak[key], status_mb(key))
            self._stop_event.wait(self.interval)

    def stop(self) -> dict[str, float]:
        self._stop_event.set()
        self.join()
        for key in self.peak:
            self.peak[key] = max(self.peak[key], status_mb(key))
        return self.peak


def corpus(utterances: int, seed: int):
    """Utterances (all in the train split) in dialogues of MELD-like lengths; deterministic in ``seed``."""
    from pipeline.utterances import Utterance

    rng = random.Random(seed)
    out, d = [], 0
    while len(out) < utterances:
        length = min(MAX_LENGTH, max(1, round(rng.expovariate(1 / MEAN_LENGTH))), utterances - len(out))
        cast = [f"S{i}" for i in range(rng.randint(1, 4))]
        for i in range(length):
            emotion = rng.randrange(len(EMOTIONS))
            out.append(
                Utterance(
                    f"train/dia{d}_utt{i}",
                    "train",
                    f"train/{d}",
                    i,
                    rng.choice(cast),
                    "text",
                    EMOTIONS[emotion],
                    SENTIMENTS[emotion % 3],
                )
            )
        d += 1
    return out


def write_features(work: Path, utterances: int, dims: dict[str, int], seed: int) -> None:
    """One feature file per modality (random rows, a tenth masked: zeros), one modality at a time."""
    import torch

    from pipeline.feature_table import FeatureTable, feature_path, save_table

    ids = [u.utterance_id for u in corpus(utterances, seed)]
    for k, (m, dim) in enumerate(dims.items()):
        g = torch.Generator().manual_seed(seed + k)
        mask = torch.rand(len(ids), generator=g) > 0.1
        features = torch.randn(len(ids), dim, generator=g)
        features[~mask] = 0
        reasons = ["ok" if ok else "missing_clip" for ok in mask.tolist()]
        save_table(
            FeatureTable(ids, features, mask, reasons, {"model": "synthetic", "dim": dim}), feature_path(m, work)
        )
        del features


def whole_file_dialogues(utterances, features_dir: Path, graphs):
    """``load_dialogues`` as it was before the mapped reader: whole tables, a copy of each dialogue's rows."""
    import torch

    from pipeline.data import MODALITIES, Dialogue
    from pipeline.feature_table import feature_path, load_table

    tables = {m: load_table(feature_path(m, features_dir)) for m in MODALITIES}
    by_dialogue: dict[str, list] = {}
    for u in utterances:
        by_dialogue.setdefault(u.dialogue_id, []).append(u)
    out = []
    for dialogue_id, utts in by_dialogue.items():
        ids = [u.utterance_id for u in utts]
        features, masks = {}, {}
        for m, table in tables.items():
            features[m], masks[m] = table.rows(ids)
        out.append(
            Dialogue(
                dialogue_id,
                ids,
                features,
                masks,
                torch.tensor([EMOTIONS.index(u.emotion) for u in utts]),
                torch.tensor([SENTIMENTS.index(u.sentiment) for u in utts]),
                graphs[dialogue_id],
            )
        )
    return out


def child(variant: str, work: Path, utterances: int, batch_dialogues: int, seed: int) -> dict:
    """Steps 1-4 of the module docstring in this process; the figures as a dict."""
    import torch

    from pipeline.config import GraphParams
    from pipeline.data import batches, load_dialogues
    from pipeline.graphs import build_dialogue_graph

    utts = corpus(utterances, seed)
    speakers: dict[str, list[str]] = {}
    for u in utts:
        speakers.setdefault(u.dialogue_id, []).append(u.speaker)
    graphs = {d: build_dialogue_graph(s, GraphParams()) for d, s in speakers.items()}
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        peak_reset = True
    except OSError:
        peak_reset = False
    before = {key: status_mb(key) for key in ("VmRSS", "RssAnon", "RssFile")}
    sampler = Sampler()
    sampler.start()
    t0 = time.perf_counter()
    if variant == "mapped":
        dialogues = load_dialogues(EMOTIONS, SENTIMENTS, utts, work, graphs)[0]["train"]
    else:
        dialogues = whole_file_dialogues(utts, work, graphs)
    t1 = time.perf_counter()
    rows, checksum = 0, 0.0
    for batch in batches(dialogues, batch_dialogues, shuffle=True, rng=random.Random(seed)):
        rows += len(batch.utterance_ids)
        checksum += float(sum(f[:, 0].sum() for f in batch.features.values()))  # every batch is read
    t2 = time.perf_counter()
    peak = sampler.stop()
    del batch
    return {
        "variant": variant,
        "dialogues": len(dialogues),
        "rows": rows,
        "load_s": round(t1 - t0, 2),
        "pass_s": round(t2 - t1, 2),
        "baseline_rss_mb": round(before["VmRSS"], 1),
        "peak_rss_mb": round(status_mb("VmHWM") - before["VmRSS"], 1) if peak_reset else None,
        "peak_anon_mb": round(peak["RssAnon"] - before["RssAnon"], 1),
        "peak_file_mb": round(peak["RssFile"] - before["RssFile"], 1),
        "end_anon_mb": round(status_mb("RssAnon") - before["RssAnon"], 1),
        "checksum": round(checksum, 3),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--utterances", type=int, default=100_000)
    parser.add_argument(
        "--dims", nargs="+", default=["text=1024", "visual=512", "audio=768"], help="modality=size for all three"
    )
    parser.add_argument("--batch-dialogues", type=int, default=4, help="train.batch_dialogues (params.yaml: 4)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--work", type=Path, help="folder for the feature files (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.work, args.utterances, args.batch_dialogues, args.seed)))
        return
    dims = dict(d.split("=") for d in args.dims)
    dims = {m: int(dims[m]) for m in ("text", "audio", "visual")}
    with tempfile.TemporaryDirectory(prefix="feature_memory_") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        write_features(work, args.utterances, dims, args.seed)
        files_mb = sum((work / f"{m}.safetensors").stat().st_size for m in dims) / 2**20
        print(f"wrote {args.utterances} utterances x {dims} ({files_mb:.0f} MB) in {time.perf_counter() - t0:.1f} s")
        results = []
        for variant in args.variants:
            command = [sys.executable, __file__, "--child", variant, "--work", str(work)]
            command += ["--utterances", str(args.utterances), "--batch-dialogues", str(args.batch_dialogues)]
            command += ["--seed", str(args.seed)]
            done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
            if done.returncode:
                sys.exit(f"{variant}: child failed\n{done.stderr[-3000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    if len({r["checksum"] for r in results}) > 1:
        sys.exit(f"the variants read different features: {[r['checksum'] for r in results]}")
    print(f"\n{'variant':8} {'load s':>7} {'pass s':>7} {'peak RSS':>9} {'peak anon':>10} {'peak file':>10}  (MB)")
    for r in results:
        print(
            f"{r['variant']:8} {r['load_s']:7.2f} {r['pass_s']:7.2f} {r['peak_rss_mb'] or float('nan'):9.0f} "
            f"{r['peak_anon_mb']:10.0f} {r['peak_file_mb']:10.0f}"
        )
    if args.json:
        record = {
            "command": " ".join(sys.argv),
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "utterances": args.utterances,
            "dims": dims,
            "files_mb": round(files_mb, 1),
            "batch_dialogues": args.batch_dialogues,
            "results": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
