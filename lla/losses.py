"""Losses shared by local rules that are not in torch.nn.functional."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Stands in for -inf on the masked self-pairs: a finite value keeps logsumexp NaN-free when a row has no other
# sample (batch of one), where -inf - (-inf) would give NaN in the forward and the backward pass.
_MASKED = -1e9


def supervised_contrastive_loss(features: Tensor, labels: Tensor, temperature: float = 0.07,
                                base_temperature: float = 0.07) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) with one view, as InfoPro's ``contrast`` mode (docs/methods/infopro.md).

    ``features`` (N, F) are L2-normalised here (normalising twice changes nothing, so already-normalised input is
    fine). For anchor i with positives P(i) = {j != i : y_j = y_i}::

        l_i = -(T / T_base) * mean_{p in P(i)} [ s_ip / T - log sum_{a != i} exp(s_ia / T) ]

    with s the cosine similarity. Self-pairs are masked out of both sums; an anchor with no positive contributes 0
    but still counts in the mean over all N anchors (as the reference divides by N). Computed in
    ``torch.promote_types(features.dtype, float32)``: reduced precision goes up to float32, float64 stays float64.
    """
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"expected features (N, F) and labels (N,), got {tuple(features.shape)} and "
                         f"{tuple(labels.shape)}")
    z = F.normalize(features.to(torch.promote_types(features.dtype, torch.float32)), dim=1)
    self_pair = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    logits = (z @ z.T / temperature).masked_fill(self_pair, _MASKED)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~self_pair
    num_pos = positive.sum(dim=1).clamp(min=1)  # anchors with no positive: 0 / 1 = 0
    mean_log_prob_pos = log_prob.masked_fill(~positive, 0.0).sum(dim=1) / num_pos
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()
