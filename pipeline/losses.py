"""Training losses: multi-task cross-entropy plus a supervised contrastive term.

``loss = CE(emotion) + loss.sentiment_weight * CE(sentiment) + loss.contrastive_weight * SupCon``

* multi-task emotion + sentiment (coarse-grained) classification: paper 000 (arXiv 2501.15063);
* supervised contrastive loss on emotion labels (Khosla et al. 2020, arXiv 2004.11362), the base of
  paper 001's inter-class contrastive learning (arXiv 2405.17900).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.config import LossParams


def supcon_loss(projections: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, "L_out" form) over one batch.

    Args:
        projections: ``[N, P]`` L2-normalised embeddings.
        labels: ``[N]`` class indices; utterances with the same label are positives of each other.
        temperature: softmax temperature tau (> 0).

    Returns:
        scalar: mean over anchors that have at least one positive of
        ``-1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p / tau) / sum_{a != i} exp(z_i.z_a / tau) )``;
        0 (with a gradient path) when no anchor has a positive.
    """
    n = projections.shape[0]
    logits = projections @ projections.T / temperature  # [N, N]
    self_mask = torch.eye(n, dtype=torch.bool, device=projections.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # [N, N]
    positives = (labels[:, None] == labels[None, :]) & ~self_mask  # [N, N]
    counts = positives.sum(1)
    anchors = counts > 0
    if not anchors.any():
        return projections.sum() * 0.0
    per_anchor = -(log_prob.masked_fill(~positives, 0.0).sum(1)[anchors]) / counts[anchors]
    return per_anchor.mean()


def erc_loss(emotion_logits: torch.Tensor, sentiment_logits: torch.Tensor, projections: torch.Tensor,
             emotion: torch.Tensor, sentiment: torch.Tensor, config: LossParams) -> tuple[torch.Tensor, dict[str, float]]:
    """The training objective for one batch.

    Args:
        emotion_logits ``[N, C_e]``, sentiment_logits ``[N, C_s]``, projections ``[N, P]``;
        emotion, sentiment: ``[N]`` label indices.

    Returns:
        (total loss, {"emotion": ..., "sentiment": ..., "contrastive": ...} as floats for logging).
    """
    emotion_ce = F.cross_entropy(emotion_logits, emotion)
    sentiment_ce = F.cross_entropy(sentiment_logits, sentiment)
    total = emotion_ce + config.sentiment_weight * sentiment_ce
    contrastive = torch.zeros((), device=emotion_logits.device)
    if config.contrastive == "supcon" and config.contrastive_weight > 0:
        contrastive = supcon_loss(projections, emotion, config.temperature)
        total = total + config.contrastive_weight * contrastive
    return total, {"emotion": emotion_ce.item(), "sentiment": sentiment_ce.item(), "contrastive": contrastive.item()}
