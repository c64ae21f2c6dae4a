"""Training losses: multi-task cross-entropy plus a supervised contrastive term.

``loss = CE(emotion) + loss.sentiment_weight * CE(sentiment) + loss.contrastive_weight * contrastive``

* multi-task emotion + sentiment (coarse-grained) classification: paper 000 (arXiv 2501.15063);
  optional class weights for the emotion CE (``loss.class_weights: inverse_frequency``);
* ``loss.contrastive: supcon``: supervised contrastive loss on emotion labels (Khosla et al. 2020,
  arXiv 2004.11362);
* ``loss.contrastive: interclass``: paper 001's inter-class contrastive learning (arXiv 2405.17900),
  rebuilt from its abstract: SupCon with rare classes weighted up, plus a term that pushes the class
  centres of the batch apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.config import LossParams


class ContrastiveQueue:
    """Projections and labels of the last ``size`` utterances of earlier batches, detached: extra
    candidates (positives and negatives, never anchors) for the contrastive loss, so that a rare class
    finds a partner outside its own batch. The queue of MoCo (He et al. 2020), used here with the
    model's own recent projections as a SupCon memory (no momentum encoder).

    Measured on MELD's train split with batches of 4 dialogues (``benchmarks/contrastive_pairs.py``):
    about 26% of the fear and disgust utterances have no positive in their batch; with a queue of 256
    utterances 0.3%.
    """

    def __init__(self, size: int):
        self.size = size
        self.projections: torch.Tensor | None = None  # [M, P], M <= size
        self.labels: torch.Tensor | None = None  # [M]

    def extend(self, projections: torch.Tensor, labels: torch.Tensor) -> None:
        """Append a batch (``[N, P]``, ``[N]``), keeping the newest ``size``."""
        projections, labels = projections.detach(), labels.detach()
        if self.projections is not None:  # (a resumed queue comes back on the CPU)
            projections = torch.cat([self.projections.to(projections), projections])
            labels = torch.cat([self.labels.to(labels.device), labels])
        self.projections, self.labels = projections[-self.size :], labels[-self.size :]

    def state_dict(self) -> dict:
        return {"projections": self.projections, "labels": self.labels}

    def load_state_dict(self, state: dict) -> None:
        self.projections, self.labels = state["projections"], state["labels"]


def supcon_loss(
    projections: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    anchor_weights: torch.Tensor | None = None,
    queue: ContrastiveQueue | None = None,
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, "L_out" form) over one batch.

    Args:
        projections: ``[N, P]`` L2-normalised embeddings.
        labels: ``[N]`` class indices; utterances with the same label are positives of each other.
        temperature: softmax temperature tau (> 0).
        anchor_weights: optional ``[N]`` weight of each anchor (weighted mean instead of mean).
        queue: optional earlier utterances (``[M, P]``, ``[M]``) added to every anchor's candidates.

    Returns:
        scalar: mean over anchors that have at least one positive of
        ``-1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p / tau) / sum_{a != i} exp(z_i.z_a / tau) )``
        (``p`` and ``a`` over the batch and the queue); 0 (with a gradient path) when no anchor has a
        positive.
    """
    n = projections.shape[0]
    candidates, candidate_labels = projections, labels
    if queue is not None and queue.projections is not None:
        candidates = torch.cat([projections, queue.projections.to(projections)])  # [N + M, P]
        candidate_labels = torch.cat([labels, queue.labels.to(labels.device)])
    logits = projections @ candidates.T / temperature  # [N, N + M]
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[:, :n] = torch.eye(n, dtype=torch.bool, device=projections.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # [N, N + M]
    positives = (labels[:, None] == candidate_labels[None, :]) & ~self_mask  # [N, N + M]
    counts = positives.sum(1)
    anchors = counts > 0
    if not anchors.any():
        return projections.sum() * 0.0
    per_anchor = -(log_prob.masked_fill(~positives, 0.0).sum(1)[anchors]) / counts[anchors]
    if anchor_weights is None:
        return per_anchor.mean()
    weights = anchor_weights[anchors]
    return (per_anchor * weights).sum() / weights.sum().clamp_min(1e-12)  # all-zero weights: 0, not NaN


def class_centre_loss(
    projections: torch.Tensor, labels: torch.Tensor, temperature: float, class_weights: torch.Tensor
) -> torch.Tensor:
    """Pushes the class centres of a batch apart (the inter-class term of paper 001, rebuilt).

    Centres ``c_k`` = normalised mean projection of class ``k`` in the batch; the loss is the
    ``class_weights``-weighted mean over present classes of ``log sum_{l != k} exp(c_k . c_l / tau)``.

    Args:
        projections: ``[N, P]`` L2-normalised; labels: ``[N]``; class_weights: ``[C]``.

    Returns:
        scalar; 0 (with a gradient path) when fewer than two classes are present.
    """
    classes = labels.unique()
    if classes.numel() < 2:
        return projections.sum() * 0.0
    onehot = (labels[:, None] == classes[None, :]).to(projections.dtype)  # [N, K]
    centres = F.normalize(onehot.T @ projections, dim=-1)  # [K, P]
    similarity = centres @ centres.T / temperature  # [K, K]
    similarity = similarity.masked_fill(torch.eye(len(classes), dtype=torch.bool, device=labels.device), float("-inf"))
    weights = class_weights[classes]
    return (torch.logsumexp(similarity, dim=1) * weights).sum() / weights.sum().clamp_min(1e-12)


@dataclass
class GlobalBatch:
    """The global batch of a data-parallel training step, as one process's loss needs it.

    With several processes (``runtime.workers``, :mod:`pipeline.train`), each process runs the model on
    its share of the batch's dialogues; the loss must still mean what it means in one process (the
    measured condition for 1 and 2 processes to agree):

    * the cross-entropies are sums over this process's utterances divided by global totals, so that
      the processes' losses (and gradients) add up to the one-process loss;
    * the contrastive loss runs over the gathered global batch. ``projections`` holds every process's
      rows in batch order; this process's rows are its live tensor (gradients flow), the others'
      are detached copies. Each process computes the same global contrastive value, and its gradient
      reaches the parameters only through its own rows, so the summed gradients are the
      one-process gradient.

    Attributes:
        projections: ``[N_global, P]``; emotion: ``[N_global]`` labels of the same rows.
        emotion_weight_sum: sum over the global batch of the emotion CE weight of each target (the
            utterance count without class weights).
        utterances: ``N_global``.
    """

    projections: torch.Tensor
    emotion: torch.Tensor
    emotion_weight_sum: float
    utterances: int


def inverse_frequency(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[num_classes]`` weights ``N / (C * count_k)`` (1 for a balanced set; absent classes get 0)."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    weights = labels.numel() / (num_classes * counts.clamp_min(1))
    return torch.where(counts > 0, weights, torch.zeros_like(weights))


def emotion_ce_weights(config: LossParams, class_weights: torch.Tensor | None) -> torch.Tensor | None:
    """The class weights of the emotion cross-entropy: ``class_weights`` when ``loss.class_weights`` asks
    for them (``inverse_frequency``), else None."""
    return class_weights if config.class_weights == "inverse_frequency" else None


def erc_loss(
    emotion_logits: torch.Tensor,
    sentiment_logits: torch.Tensor,
    projections: torch.Tensor,
    emotion: torch.Tensor,
    sentiment: torch.Tensor,
    config: LossParams,
    class_weights: torch.Tensor | None = None,
    queue: ContrastiveQueue | None = None,
    global_batch: GlobalBatch | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training objective for one batch.

    Args:
        emotion_logits ``[N, C_e]``, sentiment_logits ``[N, C_s]``, projections ``[N, P]``;
        emotion, sentiment: ``[N]`` label indices;
        class_weights: ``[C_e]`` emotion class weights (training-set inverse frequency), used by the CE
            when ``config.class_weights`` asks for them and by the ``interclass`` term (in-batch
            inverse frequency when None).
        queue: earlier batches' projections for the contrastive term (``loss.contrastive_queue``);
            this batch is appended to it afterwards. None: the batch alone (evaluation).
        global_batch: with several training processes, the global batch this process's rows belong to
            (:class:`GlobalBatch`): this process's share of the loss, which the processes' shares add
            up to. None: one process.

    Returns:
        (total loss, {"emotion": ..., "sentiment": ..., "contrastive": ...} as floats for logging).

    Raises:
        ValueError: a queue together with a global batch (not supported).
    """
    ce_weights = emotion_ce_weights(config, class_weights)
    if global_batch is None:
        emotion_ce = F.cross_entropy(emotion_logits, emotion, weight=ce_weights)
        sentiment_ce = F.cross_entropy(sentiment_logits, sentiment)
    else:
        if queue is not None:
            raise ValueError("loss.contrastive_queue is not supported with several training processes")
        emotion_ce = F.cross_entropy(emotion_logits, emotion, weight=ce_weights, reduction="sum")
        emotion_ce = emotion_ce / global_batch.emotion_weight_sum
        sentiment_ce = F.cross_entropy(sentiment_logits, sentiment, reduction="sum") / global_batch.utterances
        projections, emotion = global_batch.projections, global_batch.emotion
    total = emotion_ce + config.sentiment_weight * sentiment_ce
    contrastive = torch.zeros((), device=emotion_logits.device)
    if config.contrastive != "none" and config.contrastive_weight > 0:
        if config.contrastive == "supcon":
            contrastive = supcon_loss(projections, emotion, config.temperature, queue=queue)
        else:
            weights = (
                class_weights if class_weights is not None else inverse_frequency(emotion, emotion_logits.shape[1])
            )
            contrastive = supcon_loss(
                projections, emotion, config.temperature, anchor_weights=weights[emotion], queue=queue
            ) + class_centre_loss(projections, emotion, config.temperature, weights)
        total = total + config.contrastive_weight * contrastive
    if queue is not None:
        queue.extend(projections, emotion)
    return total, {"emotion": emotion_ce.item(), "sentiment": sentiment_ce.item(), "contrastive": contrastive.item()}


def batch_loss(
    output,
    batch,
    config: LossParams,
    class_weights: torch.Tensor | None = None,
    queue: ContrastiveQueue | None = None,
    global_batch: GlobalBatch | None = None,
):
    """:func:`erc_loss` of a model output (:class:`pipeline.modeling.ERCOutput`) on its batch
    (:class:`pipeline.data.DialogueBatch`: gold ``emotion`` / ``sentiment`` ``[N]``), with the
    training ``queue`` (``loss.contrastive_queue``) or a data-parallel ``global_batch`` when given.

    Returns:
        (loss, its parts), as :func:`erc_loss`.
    """
    return erc_loss(
        output.emotion_logits,
        output.sentiment_logits,
        output.projections,
        batch.emotion,
        batch.sentiment,
        config,
        class_weights,
        queue,
        global_batch,
    )
