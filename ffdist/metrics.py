"""Classification metrics from counts. Every rank counts its disjoint shard; the counts
are summed with one all-reduce, so the reported numbers cover exactly N samples."""

from __future__ import annotations

import torch

from ffdist.dist import all_reduce_sum


class EvalCounts:
    """Loss sum, top-1/top-5 hits, sample count and confusion matrix, kept on the device
    (no host sync per batch)."""

    def __init__(self, num_classes: int, device: torch.device):
        self.k = min(5, num_classes)
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, topk, n
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self.n = 0  # samples counted since the last reduce (host side)

    def update(self, logits: torch.Tensor, target: torch.Tensor, loss_sum: torch.Tensor) -> None:
        top = logits.topk(self.k, dim=1).indices
        hits = top.eq(target[:, None])
        # The sample count is known on the host (a shape), so it stays a Python int: a
        # torch.tensor(..., device=cuda) here would be a blocking host-to-device copy.
        self.n += len(target)
        self.sums[:3] += torch.stack([loss_sum.double(), hits[:, 0].sum().double(),
                                      hits.any(dim=1).sum().double()])
        n = self.confusion.shape[0]
        # index_add_, not bincount: CUDA bincount reads max(input) back to size its output,
        # a host sync on every batch.
        self.confusion.view(-1).index_add_(0, target * n + top[:, 0], torch.ones_like(target))

    def reduce(self) -> dict:
        """All-reduce (a sync point: once per evaluation) and turn counts into metrics."""
        self.sums[3] += self.n  # a Python scalar operand: no copy, no sync
        self.n = 0
        all_reduce_sum(self.sums)
        all_reduce_sum(self.confusion)
        loss, top1, topk, n = self.sums.tolist()
        n = max(n, 1.0)
        return {"loss": loss / n, "top1": top1 / n, "top5": topk / n, "n": int(round(n))}


def per_class(confusion: torch.Tensor) -> dict[str, list[float]]:
    """Per-class accuracy (= recall), precision, recall and F1 from a confusion matrix
    whose rows are true classes and columns predictions."""
    c = confusion.double()
    tp = c.diag()
    support = c.sum(1)
    predicted = c.sum(0)
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12),
                     torch.zeros_like(tp))
    return {"accuracy": recall.tolist(), "precision": precision.tolist(),
            "recall": recall.tolist(), "f1": f1.tolist(), "support": support.tolist()}
