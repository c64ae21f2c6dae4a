"""Stage ``extract_visual``: one face embedding per utterance (:mod:`pipeline.visual_features`).

Fails (:class:`pipeline.reports.ModalityLostError`) when the data has video and more than
``visual.max_masked_share`` of the utterances lost it (missing or corrupt clips, no face found);
audio-only files do not count.

Run: ``python -m pipeline.extract_visual --utterances data/prepared/utterances.csv --out data/features``.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.cli import run_stage
from pipeline.config import Params
from pipeline.reports import check_masked_share
from pipeline.utterances import load_utterances
from pipeline.visual_features import extract


def run(params: Params, utterances: Path, out: Path) -> None:
    """Embed the speaker's face of every utterance of ``utterances`` into ``out/visual.safetensors`` (+ report)."""
    table = load_utterances(utterances)
    report = extract(table, params, out)
    sources = {u.utterance_id: u.clip for u in table}
    check_masked_share(report, params.visual.max_masked_share, any(sources.values()), sources)


if __name__ == "__main__":
    run_stage(
        run,
        "Detect and embed speakers' faces (visual.*) into visual.safetensors.",
        {
            "utterances": "the utterance table (prepare's utterances.csv)",
            "out": "features folder: visual.safetensors, visual_report.json",
        },
        distributed="units",
    )
