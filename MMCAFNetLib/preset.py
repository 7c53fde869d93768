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


#: An image covering less than this share of one window along any axis is refused: the network
#: would see mostly padding, and its answer would be about the padding.
MIN_WINDOW_COVER = 0.25


class ImageTooSmallError(ValueError):
    """The image is far smaller than one network window; the message gives both sizes."""


def check_covers_window(volume: Any, preset: Preset, fraction: float = MIN_WINDOW_COVER) -> None:
    """Raise ImageTooSmallError when the image, on the preset's grid, is shorter than ``fraction``
    of one window along any axis (checked before windows are chosen, with or without a lesion)."""
    import numpy as np

    from MMCAFNetLib.windows import canonical_orientation, prepared_grid

    oriented = canonical_orientation(volume, contiguous=False)
    _, shape = prepared_grid(oriented, preset)
    short = [axis for axis, (n, w) in enumerate(zip(shape, preset.window)) if n < fraction * w]
    if short:
        extent = np.asarray(volume.shape, dtype=float)[::-1] * np.asarray(volume.spacing, dtype=float)
        window_mm = (
            "" if preset.spacing is None
            else " = " + " x ".join(f"{w * s:g}" for w, s in zip(preset.window, preset.spacing)) + " mm (K x J x I)"
        )
        raise ImageTooSmallError(
            f"the image is too small to classify: {' x '.join(str(n) for n in volume.shape)} voxels "
            f"({' x '.join(f'{e:.1f}' for e in extent[::-1])} mm, K x J x I), which is "
            f"{' x '.join(str(n) for n in shape)} voxels on the model's grid, while one window of the model is "
            f"{' x '.join(str(w) for w in preset.window)} voxels{window_mm}. An image must cover at least "
            f"{fraction:.0%} of a window along every axis: pass the whole CT, not a crop or a thumbnail."
        )
