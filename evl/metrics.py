"""Classification metrics, with multi-view evaluation: softmax scores averaged over each video's views."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Number of rows whose label is among the k highest logits (a 0-d tensor: no host sync)."""
    k = min(k, logits.shape[-1])
    return (logits.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1).sum()


class ViewAccumulator:
    """Sums softmax scores per video over its temporal x spatial views."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.scores: dict[int, np.ndarray] = {}
        self.labels: dict[int, int] = {}
        self.views: dict[int, int] = {}

    def add(self, logits: torch.Tensor, labels: torch.Tensor, videos: torch.Tensor) -> None:
        probs = logits.float().softmax(-1).cpu().numpy()
        for p, label, video in zip(probs, labels.tolist(), videos.tolist()):
            if video in self.scores:
                self.scores[video] += p
                self.views[video] += 1
            else:
                self.scores[video], self.labels[video], self.views[video] = p.copy(), label, 1

    def state(self) -> dict:
        return {"scores": self.scores, "labels": self.labels, "views": self.views}

    def merge(self, state: dict) -> None:
        """Fold in another worker's accumulator (views of one video may be split across workers)."""
        for video, p in state["scores"].items():
            if video in self.scores:
                self.scores[video] += p
                self.views[video] += state["views"][video]
            else:
                self.scores[video] = p.copy()  # not the other state's array: later merges add into this one
                self.labels[video], self.views[video] = state["labels"][video], state["views"][video]

    def result(self) -> EvalResult:
        videos = sorted(self.scores)
        scores = np.stack([self.scores[v] / self.views[v] for v in videos]) if videos else \
            np.zeros((0, self.num_classes))
        labels = np.array([self.labels[v] for v in videos], dtype=np.int64)
        return EvalResult.from_scores(scores, labels, self.num_classes)


def gather_views(views: ViewAccumulator) -> ViewAccumulator:
    """Every worker's per-video scores merged into one accumulator (the views of one video may be spread over
    workers). A collective: every rank of the initialised torch.distributed group calls it, and every rank gets
    the merged result. Without such a group, or with one rank, returns `views` itself."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return views
    states: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(states, views.state())
    merged = ViewAccumulator(views.num_classes)
    for state in states:
        merged.merge(state)
    return merged


@dataclass
class EvalResult:
    top1: float
    top5: float
    num_videos: int
    per_class_accuracy: np.ndarray  # [num_classes]; NaN for classes without videos
    confusion: np.ndarray  # [num_classes, num_classes], rows = true class

    @classmethod
    def from_scores(cls, scores: np.ndarray, labels: np.ndarray, num_classes: int) -> EvalResult:
        n = len(labels)
        confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        if n == 0:
            return cls(0.0, 0.0, 0, np.full(num_classes, np.nan), confusion)
        top = np.argsort(-scores, axis=1)
        top1 = float((top[:, 0] == labels).mean())
        top5 = float((top[:, :5] == labels[:, None]).any(axis=1).mean())
        np.add.at(confusion, (labels, top[:, 0]), 1)
        totals = confusion.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class = np.where(totals > 0, np.diag(confusion) / totals, np.nan)
        return cls(top1, top5, n, per_class, confusion)

    def metrics(self, prefix: str = "val_") -> dict[str, float]:
        return {f"{prefix}top1": self.top1, f"{prefix}top5": self.top5, f"{prefix}videos": float(self.num_videos)}
