"""Preprocessing presets: how a CT becomes the network's input windows. Stored in every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class Preset:
    """How windows are cut from a CT and scaled.

    ``spacing`` (mm along K, J, I) resamples the CT first so a lesion looks the same on every
    scanner; ``None`` keeps native slices and resizes the whole slice in-plane (the paper).
    ``window`` is (D, H, W) voxels. Intensities: HU clipped to ``hu_range``, scaled to [0, 1],
    minus ``mean``.
    """

    name: str
    spacing: Optional[tuple[float, float, float]]
    window: tuple[int, int, int]
    hu_range: tuple[float, float]
    mean: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spacing"] = None if self.spacing is None else list(self.spacing)
        d["window"] = list(self.window)
        d["hu_range"] = list(self.hu_range)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preset:
        spacing = d.get("spacing")
        return cls(
            name=str(d["name"]),
            spacing=None if spacing is None else tuple(float(s) for s in spacing),  # type: ignore[arg-type]
            window=tuple(int(w) for w in d["window"]),  # type: ignore[arg-type]
            hu_range=tuple(float(h) for h in d["hu_range"]),  # type: ignore[arg-type]
            mean=float(d["mean"]),
        )

    def normalise(self, hu):
        """HU (numpy array or tensor) -> network input values."""
        lo, hi = self.hu_range
        x = (hu.clip(lo, hi) - lo) / (hi - lo)
        return x - self.mean


#: The reference protocol: 12 native slices, whole 512 slice resized to 192, stored values
#: [-100, 900] (HU about -1124..-124 with intercept -1024), minus the reference's mean.
PAPER = Preset(name="paper", spacing=None, window=(12, 192, 192), hu_range=(-1124.0, -124.0), mean=0.15897)

#: Spacing-aware default: 12 x 192 x 192 voxels at 2.5 x 1.0 x 1.0 mm (30 x 192 x 192 mm), a HU
#: window spanning lung parenchyma to soft tissue so solid and ground-glass lesions both keep contrast.
DEFAULT = Preset(name="default", spacing=(2.5, 1.0, 1.0), window=(12, 192, 192), hu_range=(-1000.0, 400.0), mean=0.3)

PRESETS = {p.name: p for p in (PAPER, DEFAULT)}


def get_preset(name_or_dict: str | dict[str, Any] | Preset) -> Preset:
    if isinstance(name_or_dict, Preset):
        return name_or_dict
    if isinstance(name_or_dict, dict):
        return Preset.from_dict(name_or_dict)
    try:
        return PRESETS[name_or_dict]
    except KeyError:
        raise ValueError(f"unknown preset {name_or_dict!r}; choose one of {sorted(PRESETS)}") from None
