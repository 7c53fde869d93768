"""Heatmaps: per-window maps from the network, combined on the CT's own grid, and the labelmap.

How a heatmap is made (the Predictor calls these in this order):

1. Per window, a low-resolution map from the network: ``attention`` is the model's own
   spatial-attention (SAB) map, either of every pyramid level (``levels="all"``: each level is
   upsampled to the finest level's grid and they are averaged, so a region must be attended at
   several scales to stand out) or of the finest level alone (``levels="finest"``: the sharpest
   map; the coarse levels' cells span a third of the window and blur a lesion into its
   surroundings); the checkpoint says which (``Predictor.attention_levels``). ``gradcam`` is
   Grad-CAM on ``.features`` (the last pyramid level) for each class.
2. Each window's map is upsampled (trilinear) to the window's voxel grid, scaled by that window's
   probability of the predicted class (so where windows overlap, the ones that drove the
   max-aggregated prediction dominate; not for the attention maps of a model trained with box
   supervision, whose values are lesion probabilities comparable between windows) and pasted onto
   a canvas on the preprocessed grid, combining overlapping windows by max.
3. The canvas is normalised to 0..1 over the evaluated windows (minimum -> 0, maximum -> 1) and is 0
   outside them, then resampled to the CT grid in physical space (direction cosines respected) by
   :func:`resample_to_grid`, the single place where maps change grid.
4. The labelmap carries the predicted class's label value where the heatmap is >= the threshold.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from MMCAFNetLib.volume import Volume, grid_corners_ras

_AXIS_TOL = 1e-6


#: Which pyramid levels' SAB maps make the attention heatmap (``combine_attention_levels``).
ATTENTION_LEVELS = ("all", "finest")


def combine_attention_levels(levels: Sequence[torch.Tensor], use: str = "all") -> torch.Tensor:
    """Per-level SAB maps ``[B, 1, d, h, w]`` (finest first) -> one map ``[B, d0, h0, w0]``.

    ``use="all"``: each level is upsampled trilinearly to the finest level's grid and the levels
    are averaged; ``"finest"``: the finest level's map alone.
    """
    if not levels:
        raise ValueError("the model returned no attention maps; use heatmap='gradcam' or None")
    if use not in ATTENTION_LEVELS:
        raise ValueError(f"attention levels must be one of {ATTENTION_LEVELS}, got {use!r}")
    if use == "finest":
        finest = levels[0].float()
        return finest[:, 0] if finest.dim() == 5 else finest
    target = tuple(levels[0].shape[-3:])
    acc = None
    for level in levels:
        lv = level.float()
        if lv.dim() == 4:
            lv = lv.unsqueeze(1)
        if tuple(lv.shape[-3:]) != target:
            lv = F.interpolate(lv, size=target, mode="trilinear", align_corners=False)
        acc = lv if acc is None else acc + lv
    return (acc / len(levels))[:, 0]


def gradcam_from_gradients(features: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM: ``relu(sum_c mean(dscore/dA_c) * A_c)``; features and gradients ``[B, C, d, h, w]``."""
    weights = gradients.float().mean(dim=(2, 3, 4), keepdim=True)
    return torch.relu((weights * features.float()).sum(dim=1))


def gradcam_plus_plus_from_gradients(features: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018) with the usual exponential-score closed form:
    per-voxel weights ``alpha = g^2 / (2 g^2 + sum(A) g^3)``, channel weight ``sum(alpha relu(g))``,
    map ``relu(sum_c w_c A_c)``. Positive gradients of a small region are not averaged away by the
    rest of the map, which helps small lesions."""
    g = gradients.float()
    a = features.float()
    g2, g3 = g * g, g * g * g
    denom = 2.0 * g2 + a.sum(dim=(2, 3, 4), keepdim=True) * g3
    alpha = g2 / torch.where(denom.abs() > 1e-12, denom, torch.ones_like(denom))
    weights = (alpha * torch.relu(g)).sum(dim=(2, 3, 4), keepdim=True)
    return torch.relu((weights * a).sum(dim=1))


def upsample_map(small: np.ndarray, shape_kji: Sequence[int]) -> np.ndarray:
    """A low-resolution window map ``[d, h, w]`` -> the window's voxel grid (trilinear, cell-centred)."""
    t = torch.as_tensor(np.ascontiguousarray(small), dtype=torch.float32)[None, None]
    if tuple(t.shape[-3:]) == tuple(shape_kji):
        return t[0, 0].numpy().copy()
    out = F.interpolate(t, size=tuple(int(s) for s in shape_kji), mode="trilinear", align_corners=False)
    return out[0, 0].numpy()


class WindowCanvas:
    """Accumulates per-window maps on a reference grid (the preprocessed CT), combining by max.

    Windows that are integer-shifted sub-grids of the reference grid (what the presets produce) are
    pasted directly; any other window grid is resampled onto the reference grid in physical space.
    """

    def __init__(self, shape_kji: Sequence[int], ijk_to_ras: np.ndarray) -> None:
        self.shape = tuple(int(s) for s in shape_kji)
        self.ijk_to_ras = np.asarray(ijk_to_ras, dtype=np.float64)
        self.values = np.zeros(self.shape, dtype=np.float32)
        self.evaluated = np.zeros(self.shape, dtype=bool)

    def add(self, window_map: np.ndarray, window_ijk_to_ras: np.ndarray) -> None:
        """Paste one window's map (already on the window's voxel grid, ``[D, H, W]``)."""
        window_map = np.asarray(window_map, dtype=np.float32)
        offset = _integer_offset(self.ijk_to_ras, np.asarray(window_ijk_to_ras, dtype=np.float64))
        if offset is None:
            resampled = resample_to_grid(window_map, window_ijk_to_ras, self.ijk_to_ras, self.shape)
            inside = resample_to_grid(
                np.ones_like(window_map), window_ijk_to_ras, self.ijk_to_ras, self.shape
            )
            mask = inside > 0.5
            np.maximum(self.values, np.where(mask, resampled, 0.0), out=self.values)
            self.evaluated |= mask
            return
        start = np.array(offset[::-1])  # (k, j, i)
        src_lo = np.maximum(-start, 0)
        dst_lo = np.maximum(start, 0)
        dst_hi = np.minimum(start + np.array(window_map.shape), self.shape)
        if np.any(dst_hi <= dst_lo):
            return
        src_hi = src_lo + (dst_hi - dst_lo)
        dst = tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi))
        src = tuple(slice(a, b) for a, b in zip(src_lo, src_hi))
        np.maximum(self.values[dst], window_map[src], out=self.values[dst])
        self.evaluated[dst] = True

    def normalised(self) -> np.ndarray:
        """0..1 over the evaluated voxels (min -> 0, max -> 1); 0 outside them."""
        out = np.zeros(self.shape, dtype=np.float32)
        if not self.evaluated.any():
            return out
        vals = self.values[self.evaluated]
        lo, hi = float(vals.min()), float(vals.max())
        if hi - lo <= 1e-12:
            out[self.evaluated] = 1.0 if hi > 0 else 0.0
            return out
        out[self.evaluated] = (vals - lo) / (hi - lo)
        return out


def _integer_offset(reference: np.ndarray, window: np.ndarray) -> Optional[tuple[int, int, int]]:
    """(i, j, k) offset when ``window`` is the reference grid shifted by whole voxels, else None."""
    if not np.allclose(reference[:3, :3], window[:3, :3], rtol=1e-5, atol=1e-6):
        return None
    shift = np.linalg.solve(reference[:3, :3], window[:3, 3] - reference[:3, 3])
    rounded = np.round(shift)
    if not np.allclose(shift, rounded, atol=1e-3):
        return None
    return tuple(int(v) for v in rounded)  # type: ignore[return-value]


def resample_to_grid(
    array: np.ndarray,
    src_ijk_to_ras: np.ndarray,
    dst_ijk_to_ras: np.ndarray,
    dst_shape_kji: Sequence[int],
) -> np.ndarray:
    """Linear resampling of a map from one grid to another in physical space; 0 outside the source.

    Only the part of the destination grid that the source covers is computed (then pasted into
    zeros), and grids that share axis directions (the usual case: the preprocessed grid of a CT)
    take a separable path, so a whole 512 x 512 x 300 CT grid is filled in a fraction of a second.
    """
    src = np.asarray(array, dtype=np.float32)
    dst_shape = tuple(int(s) for s in dst_shape_kji)
    out = np.zeros(dst_shape, dtype=np.float32)
    # dst (i, j, k, 1) -> src (i, j, k, 1)
    m = np.linalg.solve(np.asarray(src_ijk_to_ras, dtype=np.float64), np.asarray(dst_ijk_to_ras, dtype=np.float64))
    # Grids whose axes are a permutation of each other (a sagittal acquisition against the canonical
    # preprocessed grid): transpose the source so the mapping becomes diagonal (separable path).
    perm = _axis_permutation(m[:3, :3])
    if perm is not None and perm != (0, 1, 2):
        # dst ijk axis a reads source ijk axis perm[a]; array axes are reversed (k, j, i).
        src = np.ascontiguousarray(np.transpose(src, [2 - perm[2 - ax] for ax in range(3)]))
        rows = np.eye(4)
        rows[:3, :3] = np.eye(3)[list(perm)]
        m = rows @ m
    # Crop the source to its non-zero support (plus one voxel) so empty space costs nothing.
    nz = np.nonzero(src.any(axis=(1, 2)))[0], np.nonzero(src.any(axis=(0, 2)))[0], np.nonzero(src.any(axis=(0, 1)))[0]
    if any(len(a) == 0 for a in nz):
        return out
    lo_kji = np.array([max(int(a[0]) - 1, 0) for a in nz])
    hi_kji = np.array([min(int(a[-1]) + 2, n) for a, n in zip(nz, src.shape)])
    src = src[lo_kji[0] : hi_kji[0], lo_kji[1] : hi_kji[1], lo_kji[2] : hi_kji[2]]
    shift = np.eye(4)
    shift[:3, 3] = -lo_kji[::-1]
    m = shift @ m  # dst ijk -> cropped src ijk
    # Destination bounding box of the cropped source's extent (voxel edges).
    src_ijk_box = np.array(
        [[x, y, z] for x in (-0.5, src.shape[2] - 0.5) for y in (-0.5, src.shape[1] - 0.5) for z in (-0.5, src.shape[0] - 0.5)]
    )
    inv = np.linalg.inv(m)
    corners = (np.c_[src_ijk_box, np.ones(8)] @ inv.T)[:, :3]
    d_lo = np.maximum(np.floor(corners.min(axis=0)).astype(int), 0)  # (i, j, k)
    d_hi = np.minimum(np.ceil(corners.max(axis=0)).astype(int) + 1, np.array(dst_shape[::-1]))
    if np.any(d_hi <= d_lo):
        return out
    sub_shape = tuple(int(v) for v in (d_hi - d_lo)[::-1])
    shift = np.eye(4)
    shift[:3, 3] = d_lo
    m_sub = m @ shift  # sub-block ijk -> cropped src ijk
    lin = m_sub[:3, :3]
    region = (slice(d_lo[2], d_hi[2]), slice(d_lo[1], d_hi[1]), slice(d_lo[0], d_hi[0]))
    if np.all(np.abs(lin - np.diag(np.diag(lin))) < _AXIS_TOL * max(1.0, np.abs(lin).max())):
        if region == tuple(slice(0, n) for n in dst_shape):
            _separable(src, np.diag(lin), m_sub[:3, 3], out)
        else:
            block = np.empty(sub_shape, dtype=np.float32)
            _separable(src, np.diag(lin), m_sub[:3, 3], block)
            out[region] = block
    else:
        out[region] = _general(src, m_sub, sub_shape)
    return out


def _axis_permutation(lin: np.ndarray) -> Optional[tuple[int, int, int]]:
    """For a 3x3 map with exactly one non-zero per row and column: the source axis of each
    destination axis; None when the grids are oblique to each other."""
    scale = max(float(np.abs(lin).max()), 1e-12)
    nonzero = np.abs(lin) > _AXIS_TOL * scale
    if not (np.all(nonzero.sum(axis=0) == 1) and np.all(nonzero.sum(axis=1) == 1)):
        return None
    return tuple(int(np.argmax(nonzero[:, a])) for a in range(3))  # type: ignore[return-value]


def _axis_weights(n_src: int, n_dst: int, scale: float, offset: float):
    """Per destination index along one axis: source neighbours, weight of the upper one, validity."""
    pos = scale * np.arange(n_dst, dtype=np.float64) + offset
    valid = (pos >= -0.5) & (pos <= n_src - 0.5)
    pos_c = np.clip(pos, 0.0, n_src - 1)
    i0 = np.floor(pos_c).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_src - 1)
    w = (pos_c - i0).astype(np.float32)
    return i0, i1, w, valid


def _lerp_axis(t: np.ndarray, axis: int, n_dst: int, scale: float, offset: float) -> np.ndarray:
    i0, i1, w, valid = _axis_weights(t.shape[axis], n_dst, scale, offset)
    view = [1] * t.ndim
    view[axis] = -1
    w = w.reshape(view)
    lo = np.take(t, i0, axis=axis)
    out = lo + (np.take(t, i1, axis=axis) - lo) * w
    if not valid.all():
        out *= valid.reshape(view).astype(np.float32)
    return out


def _separable(
    src: np.ndarray, scale_ijk: np.ndarray, offset_ijk: np.ndarray, out: np.ndarray
) -> None:
    """Axis-aligned linear interpolation into ``out``: in-plane first, then slice by slice along K.

    Plain numpy (one thread): many small multi-threaded ops stall on a busy machine. The last pass
    writes each destination slice straight into ``out`` (no full-size temporaries), which keeps a
    512 x 512 x 300 grid under a second.
    """
    k0, k1, wk, valid_k = _axis_weights(src.shape[0], out.shape[0], float(scale_ijk[2]), float(offset_ijk[2]))
    needed = np.unique(np.r_[k0[valid_k], k1[valid_k]])
    if needed.size == 0:
        out[...] = 0
        return
    base = int(needed[0])
    t = src[base : int(needed[-1]) + 1]
    # In-plane axes: shrink before growing to keep the intermediate small.
    plane = [(1, out.shape[1], 1), (2, out.shape[2], 0)]
    plane.sort(key=lambda a: a[1] / max(t.shape[a[0]], 1))
    for axis, n_dst, ijk_axis in plane:
        t = _lerp_axis(t, axis, n_dst, float(scale_ijk[ijk_axis]), float(offset_ijk[ijk_axis]))
    for k in range(out.shape[0]):
        dst = out[k]
        if not valid_k[k]:
            dst[...] = 0
            continue
        a = t[int(k0[k]) - base]
        w = np.float32(wk[k])
        if w == 0.0:
            dst[...] = a
        else:
            np.multiply(a, np.float32(1.0) - w, out=dst)
            dst += t[int(k1[k]) - base] * w


def _general(src: np.ndarray, m: np.ndarray, shape_kji: tuple, chunk: int = 16) -> np.ndarray:
    """Any affine (oblique grids): trilinear grid_sample, a few destination slices at a time."""
    inp = torch.from_numpy(np.ascontiguousarray(src))[None, None]
    n = np.array(src.shape[::-1], dtype=np.float64)  # (I, J, K) sizes
    out = np.empty(shape_kji, dtype=np.float32)
    jj, ii = np.meshgrid(np.arange(shape_kji[1]), np.arange(shape_kji[2]), indexing="ij")
    for k0 in range(0, shape_kji[0], chunk):
        ks = np.arange(k0, min(k0 + chunk, shape_kji[0]))
        pts = np.stack(
            [np.broadcast_to(ii, (len(ks), *ii.shape)), np.broadcast_to(jj, (len(ks), *jj.shape)),
             np.broadcast_to(ks[:, None, None], (len(ks), *ii.shape))],
            axis=-1,
        ).reshape(-1, 3).astype(np.float64)
        s = pts @ m[:3, :3].T + m[:3, 3]
        inside = np.all((s >= -0.5) & (s <= n - 0.5), axis=1)
        s = np.clip(s, 0, n - 1)
        grid = (2.0 * s / np.maximum(n - 1, 1) - 1.0).astype(np.float32)  # align_corners=True
        grid = torch.from_numpy(grid).view(1, len(ks), shape_kji[1], shape_kji[2], 3)
        vals = F.grid_sample(inp, grid, mode="bilinear", padding_mode="border", align_corners=True)
        vals = vals[0, 0].numpy().reshape(-1) * inside
        out[k0 : k0 + len(ks)] = vals.reshape(len(ks), shape_kji[1], shape_kji[2])
    return out


def heatmap_volume(canvas: WindowCanvas, target: Volume) -> Volume:
    """The normalised canvas on ``target``'s grid: float32 0..1, the input CT's exact geometry.

    Only the block of the target grid that the canvas can reach is resampled (the rest is 0, as
    the canvas is 0 outside the evaluated windows): a lesion's windows touch a small part of a CT.
    """
    values = np.zeros(target.shape, dtype=np.float32)
    block = target_block(canvas, target)
    if block is not None:
        lo, hi = block
        affine = target.ijk_to_ras.copy()
        affine[:3, 3] = target.ijk_to_ras[:3, :3] @ lo[::-1].astype(np.float64) + target.ijk_to_ras[:3, 3]
        part = resample_to_grid(canvas.normalised(), canvas.ijk_to_ras, affine, tuple(int(v) for v in hi - lo))
        np.clip(part, 0.0, 1.0, out=part)
        peak = float(part.max()) if part.size else 0.0
        if 0.0 < peak < 1.0:  # interpolation can miss the canvas maximum; keep the CT-grid peak at 1
            part *= np.float32(1.0 / peak)
            np.clip(part, 0.0, 1.0, out=part)
        values[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = part
    return Volume(values, target.ijk_to_ras.copy(), _geometry_meta(target, kind="heatmap"))


def target_block(canvas: WindowCanvas, target: Volume) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(lo, hi) (k, j, i), hi exclusive: the target voxels within one voxel of the canvas's extent."""
    ijk = target.ras_to_ijk_points(grid_corners_ras(canvas.ijk_to_ras, canvas.shape))
    upper = np.array(target.shape[::-1])
    lo = np.clip(np.floor(ijk.min(axis=0)).astype(np.int64) - 1, 0, upper)
    hi = np.clip(np.ceil(ijk.max(axis=0)).astype(np.int64) + 2, 0, upper)
    if np.any(hi <= lo):
        return None
    return lo[::-1], hi[::-1]


def labelmap_volume(
    heatmap: Volume, label_value: int, threshold: float, block: Optional[tuple[np.ndarray, np.ndarray]] = None
) -> Volume:
    """uint8: ``label_value`` where the heatmap is >= ``threshold`` (and above 0), 0 elsewhere.

    ``block`` ((lo, hi) in k, j, i) limits the work to the part of the grid where the heatmap can
    be non-zero (``target_block``); outside it the labelmap is 0 either way.
    """
    if not 0 < int(label_value) < 256:
        raise ValueError(f"label value {label_value} does not fit a uint8 labelmap")
    labels = np.zeros(heatmap.shape, dtype=np.uint8)
    lo, hi = block if block is not None else (np.zeros(3, dtype=np.int64), np.array(heatmap.shape))
    region = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    values = heatmap.array[region]
    labels[region][(values >= threshold) & (values > 0)] = np.uint8(label_value)
    return Volume(labels, heatmap.ijk_to_ras.copy(), _geometry_meta(heatmap, kind="labelmap"))


def _geometry_meta(source: Volume, kind: str) -> dict:
    keep = {k: source.meta[k] for k in ("series_uid", "source") if k in source.meta}
    return {**keep, "kind": kind, "modality": None}


#: How many places a heatmap names for a reader to look at (``candidate_peaks``), and how far
#: apart they must lie (mm): a small lesion is often lit without being the brightest place.
CANDIDATE_COUNT = 3
CANDIDATE_SEPARATION_MM = 20.0
#: Size (mm) of the blocks in which the other places' peaks are looked for.
CANDIDATE_GRID_MM = 3.0
#: Peaks under this share of the highest are not named: the faint rims of a map say nothing.
CANDIDATE_MIN_RELATIVE = 0.2


def _plateau_peak(arr: np.ndarray) -> Optional[tuple[tuple[int, int, int], float]]:
    """(k, j, i) and value of the maximum, or None when nothing is above 0.

    A map upsampled from a coarse feature grid has plateaus: a Grad-CAM map from a feature map one
    voxel deep is constant along the slices of its window. The first maximal voxel would then sit
    on the window's edge; the maximal voxel nearest the plateau's centroid is where the evidence is.
    The slices' maxima come first (one pass over the map), so that the plateau is looked for only
    in the slices that can hold it.
    """
    if arr.size == 0:
        return None
    slice_max = arr.reshape(arr.shape[0], -1).max(axis=1)
    top = float(slice_max.max())
    if top <= 0:
        return None
    level = top * (1.0 - 1e-6)
    plateau = np.concatenate([  # (N, 3) k, j, i
        np.c_[np.full(len(jis), k), jis] for k in np.flatnonzero(slice_max >= level)
        for jis in (np.argwhere(arr[k] >= level),)
    ])
    centre = plateau.mean(axis=0)
    k, j, i = plateau[int(np.argmin(((plateau - centre) ** 2).sum(axis=1)))]
    return (int(k), int(j), int(i)), top


def peak_ras(heatmap: Volume) -> Optional[np.ndarray]:
    """RAS position of the heatmap's maximum (the plateau's centre), or None for an all-zero map."""
    found = _plateau_peak(heatmap.array)
    if found is None:
        return None
    k, j, i = found[0]
    return heatmap.ijk_to_ras_points([[i, j, k]])[0]


def _block_max(arr: np.ndarray, step: int, axis: int) -> np.ndarray:
    """The maximum of every ``step`` consecutive entries along ``axis`` (the last block may be
    shorter); by reshaping, which is many times faster than ``np.maximum.reduceat`` here."""
    n = arr.shape[axis]
    full = n // step * step
    head = [slice(None)] * arr.ndim
    head[axis] = slice(0, full)
    shape = (*arr.shape[:axis], full // step, step, *arr.shape[axis + 1:])
    parts = [arr[tuple(head)].reshape(shape).max(axis=axis + 1)] if full else []
    if full < n:
        head[axis] = slice(full, n)
        parts.append(arr[tuple(head)].max(axis=axis, keepdims=True))
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)


def _local_maxima(arr: np.ndarray) -> np.ndarray:
    """Where the map is above 0 and at least as high as each of its 26 neighbours."""
    running = arr.copy()
    for axis in range(3):
        shifted = running.copy()
        lower = [slice(None)] * 3
        upper = [slice(None)] * 3
        lower[axis], upper[axis] = slice(None, -1), slice(1, None)
        np.maximum(shifted[tuple(lower)], running[tuple(upper)], out=shifted[tuple(lower)])
        np.maximum(shifted[tuple(upper)], running[tuple(lower)], out=shifted[tuple(upper)])
        running = shifted
    return (arr >= running) & (arr > 0)


def candidate_peaks(heatmap: Volume, count: int = CANDIDATE_COUNT, separation_mm: float = CANDIDATE_SEPARATION_MM,
                    block: Optional[tuple[np.ndarray, np.ndarray]] = None) -> list[tuple[np.ndarray, float]]:
    """The map's ``count`` highest peaks at least ``separation_mm`` apart: (RAS, value), highest
    first, the first being ``peak_ras``.

    The others are peaks of their own, not the slopes of a brighter one. The map is cut into blocks
    of about ``CANDIDATE_GRID_MM`` (a whole-volume map is as large as the CT); a block whose
    maximum is at least each neighbouring block's holds a peak, and the maximal voxel around it
    (the middle of a plateau, as for ``peak_ras``) is the place. They are taken highest first, each
    outside the boxes of half-width ``separation_mm`` around the places before; fewer where the map
    has no more peaks of at least ``CANDIDATE_MIN_RELATIVE`` of the highest. ``block`` ((lo, hi) in
    k, j, i, as ``target_block`` gives) limits the search to where the map can be non-zero.
    """
    if int(count) < 1:
        raise ValueError(f"the number of candidates must be at least 1, got {count}")
    if not float(separation_mm) >= 0:
        raise ValueError(f"the candidates' separation must be >= 0 mm, got {separation_mm}")
    lo = np.zeros(3, dtype=np.int64) if block is None else np.asarray(block[0], dtype=np.int64)
    arr = heatmap.array
    if block is not None:
        arr = arr[tuple(slice(int(a), int(b)) for a, b in zip(block[0], block[1]))]
    first = _plateau_peak(arr)
    if first is None:
        return []
    spacing_kji = np.abs(np.asarray(heatmap.spacing, dtype=np.float64))[::-1]
    half = np.ceil(float(separation_mm) / spacing_kji).astype(int)
    places = [(np.array(first[0]), first[1])]
    if int(count) > 1:
        step = np.maximum(1, np.floor(CANDIDATE_GRID_MM / spacing_kji)).astype(int)
        maxima = arr
        for axis in range(3):
            maxima = _block_max(maxima, int(step[axis]), axis)
        blocks = np.argwhere(_local_maxima(maxima))
        values = maxima[tuple(blocks.T)]
        for n in np.argsort(-values, kind="stable"):
            if values[n] < CANDIDATE_MIN_RELATIVE * first[1]:
                break
            # The block and its neighbours: a plateau spread over several blocks peaks at its centre.
            start = np.maximum(blocks[n] - 1, 0) * step
            cell = tuple(slice(int(a), int(b)) for a, b in zip(start, (blocks[n] + 2) * step))
            peak = _plateau_peak(arr[cell])  # not None: the cell holds the block's maximum, above 0
            kji = np.array(peak[0]) + start
            if any(np.all(np.abs(kji - p) <= half) for p, _ in places):
                continue
            places.append((kji, peak[1]))
            if len(places) == int(count):
                break
    return [(heatmap.ijk_to_ras_points([(kji + lo)[::-1]])[0], float(value)) for kji, value in places]
