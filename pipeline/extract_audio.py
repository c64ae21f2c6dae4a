"""Stage ``extract_audio``: one speech feature vector per utterance (:mod:`pipeline.audio_features`).

Fails (:class:`pipeline.reports.ModalityLostError`) when the data has audio and more than
``audio.max_masked_share`` of the utterances lost it (missing, corrupt, truncated or silent clips).

Run: ``python -m pipeline.extract_audio --utterances data/prepared/utterances.csv --out data/features``.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.audio_features import extract
from pipeline.cli import run_stage
from pipeline.config import Params
from pipeline.reports import check_masked_share
from pipeline.utterances import load_utterances


def run(params: Params, utterances: Path, out: Path) -> None:
    """Encode every utterance's audio of the table ``utterances`` into ``out/audio.safetensors`` (+ report)."""
    table = load_utterances(utterances)
    report = extract(table, params, out)
    sources = {u.utterance_id: u.audio_source for u in table}
    check_masked_share(report, params.audio.max_masked_share, any(sources.values()), sources)


if __name__ == "__main__":
    run_stage(
        run,
        "Encode utterance speech (audio.*) into audio.safetensors.",
        {
            "utterances": "the utterance table (prepare's utterances.csv)",
            "out": "features folder: audio.safetensors, audio_report.json",
        },
        distributed="units",
    )
