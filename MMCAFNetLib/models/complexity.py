"""Parameters and FLOPs per window, counted with torch's flop counter on the meta device.

Models are built on the meta device (no memory, no arithmetic), so counting even the full
network takes about a second; FLOPs are torch.utils.flop_counter's (2 per multiply-accumulate,
convolutions and matrix products only).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .registry import available_models, create_model, describe_model

PAPER_WINDOW = (12, 192, 192)


@dataclass
class Complexity:
    """Size and cost of one variant for one window size."""

    name: str
    parameters: int
    flops: int  # per window (batch of one), forward, eval mode
    window: Sequence[int]
    description: str = ""

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    def to_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        data["window"] = list(self.window)
        data["gflops"] = self.gflops
        return data


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Parameter elements (buffers such as BatchNorm statistics are not parameters)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: nn.Module, window: Sequence[int] = PAPER_WINDOW, batch_size: int = 1) -> int:
    """FLOPs of one eval-mode forward of ``batch_size`` windows, on the model's own device.

    Works on a model built on the meta device (see :func:`measure_model`). The model is put in
    eval mode for the count and returned to its previous mode.
    """
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    depth, height, width = (int(v) for v in window)
    image = torch.zeros(batch_size, 1, depth, height, width, device=device)
    clinical = torch.zeros(batch_size, int(getattr(model, "num_clinical", 7)), device=device)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(image, clinical)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def measure_model(name: str, window: Sequence[int] = PAPER_WINDOW, **overrides: Any) -> Complexity:
    """Build ``name`` on the meta device and count its parameters and FLOPs per window."""
    with torch.device("meta"):
        model = create_model(name, **overrides)
    return Complexity(
        name=name,
        parameters=count_parameters(model),
        flops=count_flops(model, window),
        window=tuple(int(v) for v in window),
        description=describe_model(name),
    )


def complexity_table(
    window: Sequence[int] = PAPER_WINDOW, names: Optional[Iterable[str]] = None, **overrides: Any
) -> List[Complexity]:
    """:func:`measure_model` for every registered variant (or the ``names`` given)."""
    return [measure_model(name, window, **overrides) for name in (names or available_models())]
