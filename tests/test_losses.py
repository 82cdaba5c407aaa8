"""The supervised contrastive loss keeps float64 inputs in float64 and lifts reduced precision to float32."""

import math

import torch

from lla.losses import supervised_contrastive_loss


def _reference(features, labels, temperature=0.07):
    """The loss written out anchor by anchor in Python floats (float64), following the formula in the docstring."""
    z = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in features.tolist()]
    y = labels.tolist()
    n = len(z)
    total = 0.0
    for i in range(n):
        sims = [sum(a * b for a, b in zip(z[i], z[j])) / temperature for j in range(n)]
        others = [sims[j] for j in range(n) if j != i]
        top = max(others)
        log_z = top + math.log(sum(math.exp(s - top) for s in others))
        pos = [j for j in range(n) if j != i and y[j] == y[i]]
        if pos:
            total += -sum(sims[j] - log_z for j in pos) / len(pos)
    return total / n


def test_float64_matches_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(12, 8, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 3, 3, 2, 4])  # label 4: an anchor without positives
    loss = supervised_contrastive_loss(features, labels)
    assert loss.dtype == torch.float64
    assert abs(loss.item() - _reference(features, labels)) < 1e-12


def test_reduced_precision_is_computed_in_float32():
    features = torch.randn(6, 4).to(torch.bfloat16)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    loss = supervised_contrastive_loss(features, labels)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - _reference(features.float(), labels)) < 1e-4
