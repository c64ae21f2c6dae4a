"""Stage ``extract_text``: one text feature vector per utterance (:mod:`pipeline.text_features`).

Fails (:class:`pipeline.reports.ModalityLostError`) when more than ``text.max_masked_share`` of the
utterances have no text.

Run: ``python -m pipeline.extract_text --utterances data/prepared/utterances.csv --text-encoder
models/text_encoder --out data/features``.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.cli import run_stage
from pipeline.config import Params
from pipeline.reports import check_masked_share
from pipeline.text_features import extract
from pipeline.utterances import load_utterances


def run(params: Params, utterances: Path, out: Path, text_encoder: Path | None = None) -> None:
    """Encode every utterance of the table ``utterances`` into ``out/text.safetensors`` (+ report), with
    ``text.model`` or, with ``text.finetune.enabled``, the fine-tuned encoder in ``text_encoder``."""
    report = extract(load_utterances(utterances), params, out, text_encoder=text_encoder)
    check_masked_share(report, params.text.max_masked_share, has_modality=report["utterances"] > 0)


if __name__ == "__main__":
    run_stage(
        run,
        "Encode utterance text (text.*) into text.safetensors.",
        {
            "utterances": "the utterance table (prepare's utterances.csv)",
            "text-encoder": "finetune_text's output folder (read only with text.finetune.enabled)",
            "out": "features folder: text.safetensors, text_report.json",
        },
        distributed="units",
    )
