"""Make the regression subset: whole MELD dialogues, text only, as a manifest for ``regression/``.

Reads MELD's ``train_sent_emo.csv``, ``dev_sent_emo.csv`` and ``test_sent_emo.csv`` (declare-lab/MELD,
``data/MELD/``) from ``--meld`` and picks whole dialogues per split: the split's dialogue ids, sorted,
are shuffled with ``random.Random(f"{seed}/{split}")`` and taken in that order until the split holds at
least its target number of utterances (``--train``, ``--dev``, ``--test``). Nothing is stratified; the
same CSVs and options always give the same file, byte for byte.

Writes (default paths, from the repository root):

* ``regression/data/meld_subset.csv``: the manifest layout of :func:`pipeline.datasets.read_manifest`,
  ``dialogue_id, utterance_id, speaker, text, emotion, sentiment, split`` (no media columns: a text-only
  manifest), dialogues in MELD's order, utterances in ``Utterance_ID`` order. Ids are those of the
  ``meld`` layout: dialogue ``<split>/<Dialogue_ID>``, utterance ``<split>/dia<D>_utt<U>``. ``speaker``,
  ``text``, ``emotion`` and ``sentiment`` are MELD's cells unchanged (UTF-8, MELD's typographic
  characters kept);
* ``regression/data/NOTICE.md``: source, licence (GPL-3.0), citation, the sizes and this command.

Run (from the repository root)::

    python scripts/make_regression_subset.py                      # MELD from ../shared/data/meld
    python scripts/make_regression_subset.py --meld path/to/MELD/data/MELD
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import random
import shlex
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MELD = REPO.parent / "shared" / "data" / "meld"
SPLIT_FILES = {"train": "train_sent_emo.csv", "dev": "dev_sent_emo.csv", "test": "test_sent_emo.csv"}
COLUMNS = ["dialogue_id", "utterance_id", "speaker", "text", "emotion", "sentiment", "split"]
# Utterances per split (at least; whole dialogues); None = the whole split. The test split is cheap (one
# forward pass, at the end) and its size sets most of the seed-to-seed noise of the test figures: all of
# MELD's test dialogues. Train sets the training time; dev is scored after every epoch.
DEFAULTS = {"train": 2000, "dev": 600, "test": None}
MELD_COLUMNS = ("Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID")


def read_split(path: Path) -> dict[int, list[dict]]:
    """MELD's rows of one split CSV, grouped by dialogue (``Utterance_ID`` order).

    Raises:
        SystemExit: the file is missing, not UTF-8, lacks a column, or repeats an utterance.
    """
    if not path.is_file():
        raise SystemExit(
            f"error: {path} not found; --meld must be MELD's data/MELD folder with {', '.join(SPLIT_FILES.values())}"
        )
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SystemExit(
            f"error: {path} is not UTF-8 ({err}); use the CSVs of declare-lab/MELD as released, "
            "not a copy re-saved in another encoding"
        ) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in MELD_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise SystemExit(f"error: {path}: missing column(s) {missing}; found {reader.fieldnames}")
    dialogues: dict[int, list[dict]] = {}
    seen: set[tuple[int, int]] = set()
    for row in reader:
        d, u = int(row["Dialogue_ID"]), int(row["Utterance_ID"])
        if (d, u) in seen:
            raise SystemExit(f"error: {path}: utterance Dialogue_ID={d}, Utterance_ID={u} appears twice")
        seen.add((d, u))
        dialogues.setdefault(d, []).append(row)
    for rows in dialogues.values():
        rows.sort(key=lambda r: int(r["Utterance_ID"]))
    return dialogues


def size(value: str) -> int | None:
    """A split size option: a number of utterances, or ``all`` (None)."""
    if value == "all":
        return None
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of utterances or 'all', got {value!r}")
    return int(value)


def pick(dialogues: dict[int, list[dict]], target: int | None, seed: int, split: str) -> list[int]:
    """Whole dialogues, drawn in a seeded shuffle of the sorted ids until ``target`` utterances are
    reached (None: every dialogue); returned in MELD's (sorted) order."""
    if target is None:
        return sorted(dialogues)
    order = sorted(dialogues)
    random.Random(f"{seed}/{split}").shuffle(order)
    chosen, total = [], 0
    for d in order:
        if total >= target:
            break
        chosen.append(d)
        total += len(dialogues[d])
    return sorted(chosen)


def manifest_rows(split: str, dialogues: dict[int, list[dict]], chosen: list[int]) -> list[list[str]]:
    return [
        [
            f"{split}/{d}",
            f"{split}/dia{d}_utt{int(r['Utterance_ID'])}",
            r["Speaker"],
            r["Utterance"],
            r["Emotion"],
            r["Sentiment"],
            split,
        ]
        for d in chosen
        for r in dialogues[d]
    ]


NOTICE = """\
# Regression subset of MELD (`meld_subset.csv`)

`meld_subset.csv` is a verbatim excerpt of **MELD** (Multimodal EmotionLines Dataset): whole dialogues
from the text and labels of its train, dev and test CSVs (`data/MELD/train_sent_emo.csv`,
`dev_sent_emo.csv`, `test_sent_emo.csv` of https://github.com/declare-lab/MELD), rewritten in this
project's manifest layout (`dialogue_id, utterance_id, speaker, text, emotion, sentiment, split`). The
speaker, utterance text, emotion and sentiment cells are MELD's, unchanged (UTF-8); the ids are MELD's
`Dialogue_ID`/`Utterance_ID` written as `<split>/<Dialogue_ID>` and `<split>/dia<D>_utt<U>`; MELD's other
columns (Sr No., Season, Episode, StartTime, EndTime) and its audio/video are not included. The
dialogues come from the TV series *Friends*, as in MELD.

| split | dialogues | utterances | emotions (neutral / joy / surprise / anger / sadness / disgust / fear) |
|---|---|---|---|
{table}

## Licence

MELD is distributed by its authors under the **GNU General Public License v3.0** (GPL-3.0), and so is
this file, as a copy of part of it. In practice: you may use, copy and redistribute it (changed or not),
but whoever redistributes it, or something derived from it, must do so under GPL-3.0, keep this notice
and pass on the licence text (`COPYING.GPL-3.0` in this folder, also at
https://www.gnu.org/licenses/gpl-3.0.txt); there is no warranty. The file is data that the pipeline
reads at run time, kept apart in `regression/data/`; this project does not relicense it, and it
claims no rights of its own over MELD's content.

## Citation

MELD's authors ask users of the dataset to cite:

- S. Poria, D. Hazarika, N. Majumder, G. Naik, E. Cambria, R. Mihalcea. *MELD: A Multimodal Multi-Party
  Dataset for Emotion Recognition in Conversations.* Proceedings of the 57th Annual Meeting of the
  Association for Computational Linguistics (ACL 2019), pages 527-536.
- S.-Y. Chen, C.-C. Hsu, C.-C. Kuo, L.-W. Ku. *EmotionLines: An Emotion Corpus of Multi-Party
  Conversations.* arXiv:1802.08379 (2018); LREC 2018.

## How it was made

```bash
{command}
```

`scripts/make_regression_subset.py` shuffles each split's sorted dialogue ids with a fixed seed
(`random.Random("{seed}/<split>")`) and takes whole dialogues in that order until the split holds at
least its target ({targets}); nothing is stratified.
Rerunning the command on the same CSVs rewrites this folder byte for byte. Source files (SHA-256):

{hashes}
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--meld", type=Path, default=DEFAULT_MELD, help="folder with MELD's three CSVs (default: ../shared/data/meld)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "regression" / "data" / "meld_subset.csv",
        help="manifest to write (NOTICE.md goes beside it)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--train",
        type=size,
        default=DEFAULTS["train"],
        help=f"train utterances (at least; whole dialogues), or all (default {DEFAULTS['train']})",
    )
    parser.add_argument("--dev", type=size, default=DEFAULTS["dev"], help=f"dev utterances (default {DEFAULTS['dev']})")
    parser.add_argument(
        "--test", type=size, default=DEFAULTS["test"], help="test utterances (default: all of MELD's test split)"
    )
    args = parser.parse_args(argv)
    targets = {"train": args.train, "dev": args.dev, "test": args.test}
    shown_targets = ", ".join(
        f"{split} {'all dialogues' if t is None else f'{t} utterances'}" for split, t in targets.items()
    )

    rows: list[list[str]] = []
    table, hashes = [], []
    for split, name in SPLIT_FILES.items():
        path = args.meld / name
        dialogues = read_split(path)
        chosen = pick(dialogues, targets[split], args.seed, split)
        split_rows = manifest_rows(split, dialogues, chosen)
        rows += split_rows
        counts = Counter(r[4] for r in split_rows)
        table.append(
            f"| {split} | {len(chosen)} of {len(dialogues)} | {len(split_rows)} | "
            + " / ".join(str(counts[e]) for e in ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"))
            + " |"
        )
        hashes.append(f"- `{name}`: `{hashlib.sha256(path.read_bytes()).hexdigest()}`")
        print(f"{split}: {len(chosen)} dialogues, {len(split_rows)} utterances", file=sys.stderr)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    shown = ["python", "scripts/make_regression_subset.py"]
    if args.meld.resolve() != DEFAULT_MELD.resolve():
        shown += ["--meld", "<MELD>/data/MELD"]
    if args.out.resolve() != (REPO / "regression" / "data" / "meld_subset.csv").resolve():
        shown += ["--out", str(args.out)]
    for option, default in (("seed", 0), *DEFAULTS.items()):
        if getattr(args, option) != default:
            shown += [f"--{option}", "all" if getattr(args, option) is None else str(getattr(args, option))]
    notice = NOTICE.format(
        table="\n".join(table),
        command=shlex.join(shown),
        seed=args.seed,
        targets=shown_targets,
        hashes="\n".join(hashes),
    )
    (args.out.parent / "NOTICE.md").write_text(notice, encoding="utf-8")
    print(f"wrote {args.out} ({len(rows)} utterances) and {args.out.parent / 'NOTICE.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
