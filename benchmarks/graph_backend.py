"""Graph backends: training seconds per epoch with the plain-torch graph layers against DGL's, on the CPU.

Two models are built from the same seed with the model defaults of ``params.yaml``, one with
``model.graph_backend=dgl`` and one with ``torch`` (same initial parameters), each with its own AdamW.
Each round trains every model for one epoch over the same shuffled batches (``train.batch_dialogues``
dialogues per step: forward, loss of :mod:`pipeline.losses`, backward, gradient clipping, optimizer
step, as the train stage does; no dev scoring), the backends' order alternating from round to round,
timed wall-clock. Each round then also times the graph encoder alone (:class:`DialogueGraphEncoder`
forward + backward over the epoch's batches, on random node features), alternating too.

Figures: median over the rounds of each backend's seconds per epoch, and the median over rounds of the
paired ratio torch / dgl (each round's two epochs ran back to back, which cancels much of a shared
machine's drift). Target: the torch backend takes at most 1.0x DGL's time.

Data:

* ``meld``: MELD's train split, text only, with the real pretrained all-MiniLM-L6-v2 features, prepared
  by ``benchmarks/quality.py``'s stages (cached in ``--work``; needs ``--meld``, default
  ``../shared/data/meld``); skipped when that folder is absent;
* ``synthetic``: random features and speakers with MELD's train split's size (1,038 dialogues of 1 to 24
  utterances, about 10,000 utterances; 384-d text features, audio and visual masked), graphs built by
  :func:`pipeline.graphs.build_dialogue_graph` with the ``graph`` section of ``params.yaml``. Always run.

``--relations speaker_pair`` builds the synthetic graphs with DialogueGCN's 2 * M^2 relations instead
(162 with ``graph.max_speakers`` 9). ``--threads N`` sets torch's and DGL's CPU threads (OpenMP reads
``OMP_NUM_THREADS`` once, so the option is applied before torch is imported): on a machine shared with
other jobs, 1 thread per process avoids threads of one process waiting on each other's preempted cores.

    python benchmarks/graph_backend.py --rounds 5 --threads 1 --json benchmarks/results/graph_backend.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def _threads_from_argv() -> int | None:
    """``--threads N`` must act before torch and DGL start their thread pools (OpenMP reads the
    environment once), so it is read here, before the imports below."""
    for i, arg in enumerate(sys.argv):
        if arg == "--threads" and i + 1 < len(sys.argv):
            return int(sys.argv[i + 1])
        if arg.startswith("--threads="):
            return int(arg.split("=", 1)[1])
    return None


THREADS = _threads_from_argv()
if THREADS is not None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(THREADS)

import torch  # noqa: E402

from pipeline.config import Params, load_params, parse_params  # noqa: E402
from pipeline.data import MODALITIES, Dialogue, batches  # noqa: E402
from pipeline.graphs import build_dialogue_graph, num_relations  # noqa: E402
from pipeline.losses import batch_loss  # noqa: E402
from pipeline.modeling import ERCModel  # noqa: E402

BACKENDS = ("dgl", "torch")
# MELD's train split as prepared by benchmarks/quality.py: 1,038 dialogues, at most 24 utterances each.
MELD_TRAIN_DIALOGUES, MELD_MAX_UTTERANCES = 1038, 24
SYNTHETIC_SIZES = {"text": 384, "audio": 64, "visual": 512}


def meld_dialogues(meld: Path, work: Path, base: dict) -> tuple[list[Dialogue], int]:
    """MELD's train dialogues (text-only MiniLM features), prepared through benchmarks/quality.py."""
    import quality  # benchmarks/quality.py

    from pipeline.data import load_dialogues
    from pipeline.graphs import load_graphs
    from pipeline.utterances import LABELS_FILE, UTTERANCES_FILE, load_labels, load_utterances

    raw = quality.with_overrides(base, {"data.root": str(meld.resolve()), "data.missing_clip": "text_only"})
    cwd = Path.cwd()
    try:
        quality.prepare_features(raw, work.resolve())  # changes into work/
        labels = load_labels(quality.PREPARED / LABELS_FILE)
        graphs, relations = load_graphs(quality.GRAPHS)
        splits, _ = load_dialogues(
            labels["emotions"],
            labels["sentiments"],
            load_utterances(quality.PREPARED / UTTERANCES_FILE),
            quality.FEATURES,
            graphs,
        )
    finally:
        os.chdir(cwd)
    return splits["train"], relations


def synthetic_dialogues(params: Params, seed: int = 0) -> tuple[list[Dialogue], int]:
    """Random dialogues of MELD's train size: lengths 1-24 (mean about 9.6), 1-4 speakers each."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    out = []
    for d in range(MELD_TRAIN_DIALOGUES):
        t = min(MELD_MAX_UTTERANCES, max(1, round(rng.expovariate(1 / 9.6))))
        cast = [f"S{i}" for i in range(rng.randint(1, min(4, params.graph.max_speakers)))]
        speakers = [rng.choice(cast) for _ in range(t)]
        features = {m: torch.randn(t, size, generator=g) for m, size in SYNTHETIC_SIZES.items()}
        masks = {m: torch.full((t,), m == "text") for m in MODALITIES}
        emotion = torch.randint(0, 7, (t,), generator=g)
        out.append(
            Dialogue(
                f"synthetic/{d}",
                [f"synthetic/dia{d}_utt{i}" for i in range(t)],
                features,
                masks,
                emotion,
                torch.div(emotion, 3, rounding_mode="floor"),
                build_dialogue_graph(speakers, params.graph),
            )
        )
    return out, num_relations(params.graph)


def train_epoch(
    model: ERCModel, optimizer, dialogues: list[Dialogue], params: Params, seed: int
) -> tuple[float, float]:
    """One training epoch as the train stage runs it (no dev scoring): (seconds, mean loss)."""
    model.train()
    losses = []
    torch.manual_seed(seed)  # the same dropout masks for both backends
    start = time.perf_counter()
    for batch in batches(dialogues, params.train.batch_dialogues, shuffle=True, rng=random.Random(seed)):
        result = model(batch)
        loss, _ = batch_loss(result, batch, params.loss, None)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), params.train.grad_clip)
        optimizer.step()
        losses.append(loss.item())
    return time.perf_counter() - start, statistics.fmean(losses)


def graph_encoder_seconds(model: ERCModel, collated: list, inputs: list[torch.Tensor]) -> float:
    """The graph encoder alone: forward + backward over pre-collated batches (seconds)."""
    encoder = model.graph.train()
    start = time.perf_counter()
    for batch, h in zip(collated, inputs):
        h = h.detach().requires_grad_()
        encoder(h, batch.edge_index, batch.rel_type, batch.graph).sum().backward()
    seconds = time.perf_counter() - start
    encoder.zero_grad()
    return seconds


def run(name: str, dialogues: list[Dialogue], relations: int, params: Params, rounds: int) -> dict:
    input_sizes = {m: int(f.shape[1]) for m, f in dialogues[0].features.items()}
    models, optimizers = {}, {}
    for backend in BACKENDS:
        torch.manual_seed(params.train.seed)
        models[backend] = ERCModel(input_sizes, 7, 3, relations, params.model, graph_backend=backend)
        assert models[backend].graph_backend_used == backend
        optimizers[backend] = torch.optim.AdamW(
            models[backend].parameters(), lr=params.train.lr, weight_decay=params.train.weight_decay
        )
    collated = list(batches(dialogues, params.train.batch_dialogues, shuffle=False))
    inputs = [torch.randn(sum(b.lengths), params.model.hidden_size) for b in collated]
    for backend in BACKENDS:  # warm-up (untimed): thread pools, allocator, first-call costs
        graph_encoder_seconds(models[backend], collated[:20], inputs[:20])
    n = sum(len(d) for d in dialogues)
    print(f"\n{name}: {len(dialogues)} dialogues, {n} utterances, {len(collated)} batches, {relations} relations")
    epochs = {b: [] for b in BACKENDS}
    losses = {b: [] for b in BACKENDS}
    encoder = {b: [] for b in BACKENDS}
    for r in range(rounds):
        order = BACKENDS if r % 2 == 0 else BACKENDS[::-1]
        for backend in order:
            seconds, loss = train_epoch(models[backend], optimizers[backend], dialogues, params, params.train.seed + r)
            epochs[backend].append(seconds)
            losses[backend].append(loss)
        for backend in order:
            encoder[backend].append(graph_encoder_seconds(models[backend], collated, inputs))
        print(
            f"  round {r + 1}: epoch s "
            + ", ".join(f"{b} {epochs[b][-1]:.2f}" for b in order)
            + "; graph encoder s "
            + ", ".join(f"{b} {encoder[b][-1]:.3f}" for b in order)
            + "; train loss "
            + ", ".join(f"{b} {losses[b][-1]:.5f}" for b in order),
            flush=True,
        )
    return {
        "dialogues": len(dialogues),
        "utterances": n,
        "batches": len(collated),
        "relations": relations,
        "epoch_seconds": epochs,
        "graph_encoder_seconds": encoder,
        "train_loss": losses,
        "median_epoch_seconds": {b: statistics.median(v) for b, v in epochs.items()},
        "median_ratio": statistics.median(t / d for t, d in zip(epochs["torch"], epochs["dgl"])),
        "median_graph_encoder_ms_per_batch": {
            b: 1e3 * statistics.median(v) / len(collated) for b, v in encoder.items()
        },
        "median_graph_encoder_ratio": statistics.median(t / d for t, d in zip(encoder["torch"], encoder["dgl"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meld", type=Path, default=REPO.parent / "shared/data/meld")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks/work/meld_text")
    parser.add_argument("--rounds", type=int, default=5, help="epochs per backend (>= 3)")
    parser.add_argument("--datasets", nargs="+", default=["meld", "synthetic"], choices=["meld", "synthetic"])
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads of torch and DGL (default: torch's default)"
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N dialogues (quick checks)")
    parser.add_argument(
        "--relations",
        choices=["same_other", "speaker_pair"],
        default=None,
        help="graph.relations of the synthetic graphs (default: params.yaml's; MELD's cached graphs keep theirs)",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.rounds < 3:
        parser.error("--rounds must be at least 3 (medians)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    raw = load_params(REPO / "params.yaml").model_dump(mode="json")
    params = parse_params(raw)
    if args.relations:
        params = params.model_copy(update={"graph": params.graph.model_copy(update={"relations": args.relations})})
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "torch": torch.__version__,
        "model": params.model.model_dump(),
        "batch_dialogues": params.train.batch_dialogues,
        "rounds": args.rounds,
        "limit": args.limit,
        "synthetic_relations": params.graph.relations,
        "datasets": {},
    }
    for name in args.datasets:
        if name == "meld":
            if not args.meld.is_dir():
                print(f"meld: {args.meld} is absent, skipped")
                continue
            dialogues, relations = meld_dialogues(args.meld, args.work, raw)
        else:
            dialogues, relations = synthetic_dialogues(params)
        dialogues = dialogues[: args.limit]
        results["datasets"][name] = run(name, dialogues, relations, params, args.rounds)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2))

    print(f"\nmedians over {args.rounds} rounds; target: torch takes at most 1.0x DGL's time per epoch")
    print("| data | backend | s/epoch (median) | range | ratio torch/dgl | graph encoder ms/batch | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results["datasets"].items():
        for b in BACKENDS:
            epochs = r["epoch_seconds"][b]
            ratio = f"{r['median_ratio']:.2f}" if b == "torch" else "-"
            encoder_ratio = f"{r['median_graph_encoder_ratio']:.2f}" if b == "torch" else "-"
            print(
                f"| {name} | {b} | {r['median_epoch_seconds'][b]:.2f} | {min(epochs):.2f}-{max(epochs):.2f} | "
                f"{ratio} | {r['median_graph_encoder_ms_per_batch'][b]:.2f} | {encoder_ratio} |"
            )


if __name__ == "__main__":
    main()
