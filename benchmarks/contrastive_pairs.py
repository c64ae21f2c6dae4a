"""How often does the contrastive loss find no positive partner for an utterance? (MELD train split)

The supervised contrastive loss (``loss.contrastive: supcon``, :func:`pipeline.losses.supcon_loss`) only
uses an utterance as an anchor when another utterance of its class is in the same batch. Training
batches hold ``train.batch_dialogues`` dialogues (4), about 40 utterances: a rare class (MELD's fear and
disgust, under 3% of the utterances each) often has a single utterance in the batch, which then gets
no contrastive signal at all. This script measures it on the real batch plan (dialogues shuffled per
epoch as :func:`pipeline.data.batches` does), for several batch sizes and for a feature queue of the
previous batches' utterances (MoCo, He et al. 2020; a SupCon memory as in Khosla et al. 2020 practice):

    python benchmarks/contrastive_pairs.py --meld ../shared/data/meld --epochs 5

It reads only the labels (``prepare`` in-process on MELD's CSVs, no features, no training) and prints,
per class, the share of its train utterances that had no positive partner, averaged over the epochs.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import Counter, deque
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import parse_params  # noqa: E402
from pipeline.prepare import prepare  # noqa: E402


def no_partner_share(
    dialogues: list[list[str]], batch_dialogues: int, queue: int, epochs: int, seed: int = 0
) -> dict[str, float]:
    """Per class, the share of its utterances (as anchors) with no other utterance of their class in the
    batch or in the queue (the last ``queue`` utterances of the previous batches), over ``epochs`` shuffles.

    Args:
        dialogues: per training dialogue, its utterances' emotion labels.
    """
    rng = random.Random(seed)
    alone, total = Counter(), Counter()
    for _ in range(epochs):
        order = list(range(len(dialogues)))
        rng.shuffle(order)
        memory: deque[str] = deque(maxlen=queue) if queue else deque(maxlen=0)
        for start in range(0, len(order), batch_dialogues):
            batch = [label for i in order[start : start + batch_dialogues] for label in dialogues[i]]
            counts = Counter(batch) + Counter(memory)
            for label in batch:
                total[label] += 1
                alone[label] += counts[label] == 1
            memory.extend(batch)
    return {label: alone[label] / total[label] for label in sorted(total, key=lambda c: -total[c])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meld", type=Path, default=REPO.parent / "shared/data/meld", help="MELD's CSV folder")
    parser.add_argument("--epochs", type=int, default=5, help="shuffles averaged over")
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16, 32], help="dialogues per batch")
    parser.add_argument("--queues", type=int, nargs="+", default=[256, 1024], help="queue sizes (utterances), batch 4")
    args = parser.parse_args()
    params = parse_params({"data": {"root": str(args.meld), "layout": "meld", "missing_clip": "text_only"}})
    utterances, labels, _ = prepare(params)
    dialogues: dict[str, list[str]] = {}
    for u in utterances:
        if u.split == "train":
            dialogues.setdefault(u.dialogue_id, []).append(u.emotion)
    train = list(dialogues.values())
    counts = Counter(label for d in train for label in d)
    n = sum(counts.values())
    print(f"MELD train: {len(train)} dialogues, {n} utterances; " + ", ".join(f"{c} {counts[c]}" for c in counts))
    rows = [(f"batch of {b} dialogues", no_partner_share(train, b, 0, args.epochs)) for b in args.batches]
    rows += [(f"batch of 4 + queue of {q}", no_partner_share(train, 4, q, args.epochs)) for q in args.queues]
    classes = list(rows[0][1])
    print("\nshare of train utterances with no positive partner (%), mean over", args.epochs, "epochs")
    print("| batches | " + " | ".join(f"{c} ({100 * counts[c] / n:.1f}%)" for c in classes) + " |")
    print("|---|" + "---|" * len(classes))
    for name, share in rows:
        print(f"| {name} | " + " | ".join(f"{100 * share[c]:.1f}" for c in classes) + " |")


if __name__ == "__main__":
    main()
