"""Epoch samplers whose order is a pure function of (seed, epoch): resuming needs no hidden state,
and 1 process and N processes see the same global sequence of samples.

Each yielded item is ``(dataset_index, draw, epoch)``: ``draw`` is the item's position in the
epoch's global sequence, so the dataset can derive per-draw augmentation from (seed, epoch, draw)
(also inside persistent loader workers) and a case drawn twice (balanced sampling draws with
replacement) is augmented differently each time.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data.distributed import DistributedSampler


class EpochSampler(DistributedSampler):
    """Shuffled (optionally class-balanced) order for one epoch, sharded over ranks.

    A ``torch.utils.data.DistributedSampler`` (the same sharding and ``set_epoch``) that adds class
    balancing and the draw position: the global sequence is padded by wrapping to a
    multiple of ``num_replicas`` and rank r takes positions r, r + R, r + 2R, ... Consecutive
    batches of size b on R ranks then cover exactly the positions of one global batch of size
    b * R on a single process. ``balanced`` draws each class equally often (with replacement),
    ``len(labels)`` draws per epoch.
    """

    def __init__(
        self,
        labels: Sequence[int],
        seed: int = 0,
        shuffle: bool = True,
        balanced: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        num_samples: Optional[int] = None,
    ):
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        super().__init__(range(len(self.labels)), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.balanced = balanced
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0
        self.total = int(num_samples if num_samples is not None else len(self.labels))
        self.per_rank = math.ceil(self.total / self.num_replicas) if self.total else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])

    def global_order(self) -> list[int]:
        g = torch.Generator()
        g.manual_seed(self.seed * 100003 + self.epoch)
        n = len(self.labels)
        if n == 0:
            return []
        if self.balanced:
            counts = torch.bincount(self.labels)
            weights = torch.zeros(n, dtype=torch.float64)
            present = counts > 0
            num_present = int(present.sum())
            for c in torch.nonzero(present).flatten().tolist():
                weights[self.labels == c] = 1.0 / (num_present * int(counts[c]))
            order = torch.multinomial(weights, self.total, replacement=True, generator=g).tolist()
        elif self.shuffle:
            order = torch.randperm(n, generator=g).tolist()
            while len(order) < self.total:
                order += torch.randperm(n, generator=g).tolist()
            order = order[: self.total]
        else:
            order = [i % n for i in range(self.total)]
        padded = self.per_rank * self.num_replicas
        order += order[: padded - len(order)]
        return order

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        order = self.global_order()
        for pos in range(self.rank, len(order), self.num_replicas):
            yield order[pos], pos, self.epoch

    def __len__(self) -> int:
        return self.per_rank
