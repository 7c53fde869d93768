"""preview.png: axial, coronal and sagittal CT slices through the lesion (or the heatmap peak),
with the heatmap overlay, a colour bar for it, the heatmap's candidate places near each slice
(numbered as in prediction.json) and a legend for the markers.

The volume is shown in the patient frame: its axes are permuted and flipped to the nearest RAS
axes (oblique grids are shown on their nearest axes, which is enough for a preview), axial and
coronal views in the radiological convention (patient's right on the image's left). matplotlib is
imported only here, lazily, with the Agg backend, so the library stays usable without it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from MMCAFNetLib.atomic import atomic_output
from MMCAFNetLib.volume import Volume

CT_WINDOW = (-1200.0, 400.0)  # HU shown from black to white: lung and soft tissue


def _nearest_ras_frame(volume: Volume) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """For R, A, S: the array axis (0=K, 1=J, 2=I) running closest to it, and whether it runs backwards."""
    d = volume.directions  # columns: i, j, k directions in RAS
    used: set[int] = set()
    axes, flips = [], []
    for ras in range(3):
        order = np.argsort(-np.abs(d[ras]))
        col = next(int(c) for c in order if int(c) not in used)
        used.add(col)
        axes.append(2 - col)  # ijk column -> array axis (K, J, I order)
        flips.append(bool(d[ras, col] < 0))
    return tuple(axes), tuple(flips)  # type: ignore[return-value]


def to_ras_array(volume: Volume, array: Optional[np.ndarray] = None) -> np.ndarray:
    """``array`` (default the volume's) reordered to [R, A, S] with every axis increasing."""
    arr = volume.array if array is None else array
    axes, flips = _nearest_ras_frame(volume)
    out = np.transpose(arr, axes)
    for axis, flip in enumerate(flips):
        if flip:
            out = np.flip(out, axis=axis)
    return out


def _ras_index(volume: Volume, point_ras: Sequence[float]) -> np.ndarray:
    """Voxel position of a RAS point in the reordered [R, A, S] array (continuous)."""
    axes, flips = _nearest_ras_frame(volume)
    ijk = volume.ras_to_ijk_points(np.asarray(point_ras, dtype=float))[0]
    kji = ijk[::-1]
    shape = volume.shape
    out = np.empty(3)
    for r in range(3):
        v = kji[axes[r]]
        out[r] = shape[axes[r]] - 1 - v if flips[r] else v
    return out


#: A candidate place is drawn on a view when it lies within this distance (mm) of the view's slice.
CANDIDATE_NEAR_MM = 10.0


def candidates_in_view(ct: Volume, candidates_ras: Sequence[Sequence[float]], focus: np.ndarray, normal_axis: int,
                       near_mm: float = CANDIDATE_NEAR_MM) -> list[tuple[int, np.ndarray]]:
    """(rank from 1, position in the [R, A, S] array) of the candidates within ``near_mm`` of the
    slice through ``focus`` (array index) across ``normal_axis`` (0 R, 1 A, 2 S)."""
    axes, _ = _nearest_ras_frame(ct)
    step = float(ct.spacing[2 - axes[normal_axis]])
    shown = []
    for rank, ras in enumerate(candidates_ras, 1):
        index = _ras_index(ct, ras)
        if abs(index[normal_axis] - focus[normal_axis]) * step <= near_mm:
            shown.append((rank, index))
    return shown


def preview_focus(
    ct: Volume,
    heatmap: Optional[Volume] = None,
    lesion_box_ras: Optional[Sequence[Sequence[float]]] = None,
    focus_ras: Optional[Sequence[float]] = None,
) -> tuple[np.ndarray, str]:
    """(RAS point the three slices pass through, what it is): the given point, else the given
    lesion's centre, else the heatmap's peak, else the volume's centre."""
    if focus_ras is not None:
        return np.asarray(focus_ras, dtype=float), "given point"
    if lesion_box_ras is not None:
        return (np.asarray(lesion_box_ras[0], float) + np.asarray(lesion_box_ras[1], float)) / 2, "lesion"
    if heatmap is not None:
        from MMCAFNetLib.heatmap import peak_ras

        peak = peak_ras(heatmap)
        if peak is not None:
            return np.asarray(peak, dtype=float), "heatmap peak"
    centre = (np.array(ct.shape[::-1], float) - 1) / 2
    return ct.ijk_to_ras_points([centre])[0], "volume centre"


def render_preview(
    ct: Volume,
    path: str | os.PathLike,
    heatmap: Optional[Volume] = None,
    lesion_box_ras: Optional[Sequence[Sequence[float]]] = None,
    title: str = "",
    focus_ras: Optional[Sequence[float]] = None,
    candidates_ras: Sequence[Sequence[float]] = (),
) -> Path:
    """Write a three-view PNG (atomically). Slices pass through ``focus_ras``, else the given
    lesion (the box centre; a point is a box of size 0), else the heatmap peak, else the volume
    centre: a reader checks the map against the lesion they marked, so the views show that lesion
    even when the map's peak lies elsewhere. The lesion is drawn as a cyan box (a cross for a
    point), the heatmap's candidate places within ``CANDIDATE_NEAR_MM`` of a view's slice as
    numbered yellow circles, and a colour bar gives the heatmap's scale."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    ct_ras = to_ras_array(ct)  # a view; only the three slices drawn are converted to float
    heat_ras = to_ras_array(heatmap) if heatmap is not None else None
    spacing = ct.spacing  # along I, J, K
    axes, _ = _nearest_ras_frame(ct)
    sp_ras = np.array([spacing[2 - axes[r]] for r in range(3)])  # mm along R, A, S

    focus_ras, focus_source = preview_focus(ct, heatmap, lesion_box_ras, focus_ras)
    focus = np.clip(np.round(_ras_index(ct, focus_ras)).astype(int), 0, np.array(ct_ras.shape) - 1)

    box_idx = None
    is_point = lesion_box_ras is not None and bool(
        np.allclose(np.asarray(lesion_box_ras[0], float), np.asarray(lesion_box_ras[1], float)))
    if lesion_box_ras is not None:
        lo, hi = np.asarray(lesion_box_ras[0], float), np.asarray(lesion_box_ras[1], float)
        corners = [_ras_index(ct, [x, y, z]) for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
        box_idx = (np.min(corners, axis=0), np.max(corners, axis=0))

    # (name, slicing, horizontal RAS axis, vertical RAS axis, flip horizontally for radiological view)
    views = (
        ("axial", (slice(None), slice(None), focus[2]), 0, 1, True),
        ("coronal", (slice(None), focus[1], slice(None)), 0, 2, True),
        ("sagittal", (focus[0], slice(None), slice(None)), 1, 2, False),
    )
    fig = Figure(figsize=(12.8, 4.8), dpi=100)
    grid = fig.add_gridspec(1, 4, width_ratios=[1, 1, 1, 0.045], wspace=0.06)
    for n, (name, sl, h_axis, v_axis, flip_h) in enumerate(views):
        ax = fig.add_subplot(grid[0, n])
        # rows = vertical axis (drawn bottom-up), columns = horizontal axis; radiological views put
        # the patient's right (high R) on the image's left.
        def oriented(a: np.ndarray, flip: bool = flip_h) -> np.ndarray:
            return a.T[:, ::-1] if flip else a.T

        w_mm = ct_ras.shape[h_axis] * sp_ras[h_axis]
        h_mm = ct_ras.shape[v_axis] * sp_ras[v_axis]
        extent = (0.0, w_mm, 0.0, h_mm)
        ax.imshow(oriented(ct_ras[sl].astype(np.float32)), cmap="gray", vmin=CT_WINDOW[0], vmax=CT_WINDOW[1], origin="lower",
                  extent=extent, interpolation="bilinear")
        if heat_ras is not None:
            hmap = np.ma.masked_less(oriented(heat_ras[sl]), 0.05)
            ax.imshow(hmap, cmap="inferno", vmin=0.0, vmax=1.0, alpha=0.45, origin="lower", extent=extent,
                      interpolation="bilinear")
        if box_idx is not None:
            lo, hi = box_idx
            x0, x1 = lo[h_axis] * sp_ras[h_axis], (hi[h_axis] + 1) * sp_ras[h_axis]
            if flip_h:
                x0, x1 = w_mm - x1, w_mm - x0
            y0, y1 = lo[v_axis] * sp_ras[v_axis], (hi[v_axis] + 1) * sp_ras[v_axis]
            if is_point:
                ax.plot([(x0 + x1) / 2], [(y0 + y1) / 2], marker="+", color="cyan", markersize=14, mew=1.5)
            else:
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="cyan", linewidth=1.2))
        normal = 3 - h_axis - v_axis
        for rank, index in candidates_in_view(ct, candidates_ras, focus, normal):
            x = (index[h_axis] + 0.5) * sp_ras[h_axis]
            x = w_mm - x if flip_h else x
            y = (index[v_axis] + 0.5) * sp_ras[v_axis]
            ax.plot([x], [y], marker="o", markersize=13, markerfacecolor="none", markeredgecolor="yellow", mew=1.3)
            ax.text(x + 0.04 * w_mm, y + 0.04 * h_mm, str(rank), color="yellow", fontsize=9, fontweight="bold")
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
        left, right = ("R", "L") if flip_h else ("P", "A")
        ax.text(0.02, 0.5, left, color="yellow", transform=ax.transAxes, fontsize=9, va="center")
        ax.text(0.96, 0.5, right, color="yellow", transform=ax.transAxes, fontsize=9, va="center")
    if heat_ras is not None:
        bar = fig.colorbar(ScalarMappable(norm=Normalize(0.0, 1.0), cmap="inferno"), cax=fig.add_subplot(grid[0, 3]))
        bar.set_label("heatmap (0-1; below 0.05 not drawn)", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    handles = []
    if lesion_box_ras is not None:
        handles.append(Line2D([], [], color="cyan", marker="+" if is_point else "s", linestyle="none",
                              markerfacecolor="none", markersize=9,
                              label="lesion point given" if is_point else "lesion box given"))
    if len(candidates_ras):
        handles.append(Line2D([], [], color="yellow", marker="o", linestyle="none", markerfacecolor="none",
                              markersize=9, label=f"heatmap places 1-{len(candidates_ras)} "
                              f"(within {CANDIDATE_NEAR_MM:g} mm of the slice)"))
    handles.append(Line2D([], [], color="none", label=f"slices through the {focus_source}"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.subplots_adjust(left=0.02, right=0.95, top=0.88, bottom=0.08)
    path = Path(path)
    with atomic_output(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return path
