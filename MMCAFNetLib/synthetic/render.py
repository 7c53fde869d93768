"""Rendering a plan into a CT volume and lesion mask, and ``make_case`` (one case in memory)."""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from MMCAFNetLib.synthetic.design import (
    _PADDING_HU,
    AIR_HU,
    DEFAULT_EVIDENCE,
    DEFAULT_SMALL_LESION_SHARE,
    EvidenceDesign,
    LesionPlan,
    PatientPlan,
    ScannerPlan,
    SyntheticCase,
)
from MMCAFNetLib.synthetic.draw import _lung_geometry, draw_patient
from MMCAFNetLib.volume import Volume, make_ijk_to_ras

# --------------------------------------------------------------------------------------------------
# Rendering


def plan_ijk_to_ras(plan: PatientPlan) -> np.ndarray:
    """IJK->RAS of the rendered grid: i towards patient left, j posterior, k superior (DICOM axial)."""
    sc = plan.scanner
    d = sc.pixel_spacing
    half = (sc.size - 1) / 2.0 * d
    origin = (sc.grid_center[0] + half, sc.grid_center[1] + half, sc.first_slice_s)
    directions = np.diag([-1.0, -1.0, 1.0])
    return make_ijk_to_ras((d, d, sc.slice_thickness), origin, directions)


class _Grid:
    """Axis coordinates of the grid in the body frame (x = R, y = A, z = S - body_z0)."""

    def __init__(self, plan: PatientPlan) -> None:
        sc = plan.scanner
        m = plan_ijk_to_ras(plan)
        self.affine = m
        self.spacing = np.array([sc.pixel_spacing, sc.pixel_spacing, sc.slice_thickness])
        n = sc.size
        self.x = (m[0, 3] + m[0, 0] * np.arange(n)).astype(np.float32)  # along i
        self.y = (m[1, 3] + m[1, 1] * np.arange(n)).astype(np.float32)  # along j
        self.z = (m[2, 3] + m[2, 2] * np.arange(sc.num_slices) - plan.anatomy.body_z0).astype(np.float32)
        self.shape = (sc.num_slices, n, n)

    def index_range(self, lo: np.ndarray, hi: np.ndarray) -> Optional[tuple[slice, slice, slice]]:
        """Slices (k, j, i) of the voxels whose centres may lie within the body-frame box [lo, hi]."""
        out = []
        for axis_coords, a, b in ((self.z, lo[2], hi[2]), (self.y, lo[1], hi[1]), (self.x, lo[0], hi[0])):
            idx = np.nonzero((axis_coords >= a) & (axis_coords <= b))[0]
            if idx.size == 0:
                return None
            out.append(slice(int(idx[0]), int(idx[-1]) + 1))
        return tuple(out)  # type: ignore[return-value]

    def local(self, sl: tuple[slice, slice, slice]):
        return (self.z[sl[0]][:, None, None], self.y[sl[1]][None, :, None], self.x[sl[2]][None, None, :])


def _ellipse(x, y, cx, cy, rx, ry):
    rx = np.maximum(rx, 1e-3)
    ry = np.maximum(ry, 1e-3)
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2


def _render_background(plan: PatientPlan, grid: _Grid, k0: int, k1: int) -> np.ndarray:
    """Analytic anatomy of slices k0..k1 (HU, float32)."""
    an = plan.anatomy
    z = grid.z[k0:k1][:, None, None]
    y = grid.y[None, :, None]
    x = grid.x[None, None, :]
    ax, ay = an.ax, an.ay
    shape = (k1 - k0, grid.shape[1], grid.shape[2])
    hu = np.full(shape, AIR_HU, dtype=np.float32)

    body_r = _ellipse(x, y, 0.0, 0.0, ax, ay)
    in_body = np.broadcast_to(body_r <= 1.0, shape)
    hu[in_body] = -100.0  # subcutaneous fat
    wall = np.broadcast_to(_ellipse(x, y, 0.0, 0.0, ax - an.fat, ay - an.fat) <= 1.0, shape)
    hu[wall] = 45.0  # chest wall muscle
    inner = np.broadcast_to(_ellipse(x, y, 0.0, 0.0, ax - an.fat - 14.0, ay - an.fat - 12.0) <= 1.0, shape)
    u = (z - an.z_base) / an.lung_height
    thorax = inner & (u > -0.12)
    hu[thorax] = -70.0  # mediastinal fat
    abdomen = inner & (u <= -0.12)
    hu[abdomen] = 55.0  # liver / abdomen below the domes

    # lungs with diaphragm domes (the right dome sits higher)
    lungs = np.zeros(shape, dtype=bool)
    for side in (1, -1):
        cx, cy, lx, ly = _lung_geometry(an, side, z)
        r = _ellipse(x, y, cx, cy, lx, ly)
        dome = (48.0 if side > 0 else 40.0) * (1.0 - np.clip(r, 0, 1))
        lungs |= (r <= 1.0) & (z > an.z_base + dome - 40.0) & (u <= 1.0)
    lungs &= inner
    # liver dome under the lungs
    hu[inner & (u > -0.12) & (u < 0.15) & ~lungs] = 55.0
    hu[lungs] = -860.0

    # heart (carves the left lung), aorta
    zh = an.z_base + 0.27 * an.lung_height
    heart = ((x + 0.1 * ax) / (0.33 * ax)) ** 2 + ((y - 0.28 * ay) / (0.4 * ay)) ** 2 + (
        (z - zh) / (0.22 * an.lung_height)
    ) ** 2 <= 1.0
    hu[np.broadcast_to(heart, shape)] = 40.0
    blood = 180.0 if an.contrast else 42.0
    z_arch = an.z_base + 0.72 * an.lung_height
    desc = (_ellipse(x, y, -0.1 * ax, -0.45 * ay, 12.0, 12.0) <= 1.0) & (z < z_arch)
    asc = (_ellipse(x, y, 0.03 * ax, 0.18 * ay, 15.0, 15.0) <= 1.0) & (z > zh) & (z < z_arch)
    hu[np.broadcast_to(desc | asc, shape)] = blood
    # trachea above the carina
    carina = an.z_base + 0.62 * an.lung_height
    tr = _ellipse(x, y, 0.0, 0.1 * ay, 9.0, 8.0)
    trachea = (tr <= 1.0) & (z > carina)
    tr_wall = (tr <= 1.5) & (z > carina)
    hu[np.broadcast_to(tr_wall, shape)] = 50.0
    hu[np.broadcast_to(trachea, shape)] = AIR_HU

    # spine: vertebral body with cortical rim and discs, canal, spinous process
    vy = -0.66 * ay
    vb = _ellipse(x, y, 0.0, vy, 19.0, 16.0)
    disc = np.mod(z - 3.0, 28.0) < 5.0
    bone = np.where(disc, 80.0, np.where(vb > 0.72, 750.0, 230.0)).astype(np.float32)
    mask = np.broadcast_to(vb <= 1.0, shape)
    hu[mask] = np.broadcast_to(bone, shape)[mask]
    canal = np.broadcast_to(_ellipse(x, y, 0.0, vy - 25.0, 8.0, 7.0) <= 1.0, shape)
    hu[canal] = 20.0
    process = np.broadcast_to((_ellipse(x, y, 0.0, vy - 42.0, 5.0, 13.0) <= 1.0) & ~disc, shape)
    hu[process] = 600.0
    lamina = np.broadcast_to((_ellipse(x, y, 0.0, vy - 30.0, 17.0, 5.0) <= 1.0) & (np.abs(x) > 7.0) & ~disc, shape)
    hu[lamina] = 550.0
    # sternum
    st = (_ellipse(x, y, 0.0, ay - an.fat - 9.0, 15.0, 6.0) <= 1.0) & (u > 0.25) & (u < 0.95)
    hu[np.broadcast_to(st, shape)] = 420.0
    # ribs: a ring inside the chest wall, sloping down anteriorly, one every 26 mm
    rho = np.sqrt(body_r)
    ring_r = 1.0 - (an.fat + 6.0) / ax
    theta = np.arctan2(y / ay, x / ax)
    slope = -32.0 * np.sin(theta)
    ribs = (np.abs(rho - ring_r) * ax < 4.0) & (np.mod(z - slope, 26.0) < 9.0) & (u > -0.1) & (u < 1.0)
    ribs &= ~((np.abs(x) < 0.14 * ax) & (y > 0))
    hu[np.broadcast_to(ribs, shape)] = 650.0
    return hu


def _stamp_capsule(
    hu: np.ndarray, grid: _Grid, p0: np.ndarray, p1: np.ndarray, radius: float, value: float,
    only_below: Optional[float] = None, max_len: float = 12.0,
) -> None:
    """Blend a tube of ``radius`` (soft edge one voxel wide) into ``hu``, piece by piece."""
    length = float(np.linalg.norm(p1 - p0))
    pieces = max(1, math.ceil(length / max_len))
    edge = float(min(grid.spacing[0], grid.spacing[2]))
    for t in range(pieces):
        a = p0 + (p1 - p0) * (t / pieces)
        b = p0 + (p1 - p0) * ((t + 1) / pieces)
        pad = radius + edge
        sl = grid.index_range(np.minimum(a, b) - pad, np.maximum(a, b) + pad)
        if sl is None:
            continue
        zz, yy, xx = grid.local(sl)
        ab = b - a
        denom = float(ab @ ab) or 1.0
        tt = np.clip(((xx - a[0]) * ab[0] + (yy - a[1]) * ab[1] + (zz - a[2]) * ab[2]) / denom, 0.0, 1.0)
        d2 = (xx - a[0] - tt * ab[0]) ** 2 + (yy - a[1] - tt * ab[1]) ** 2 + (zz - a[2] - tt * ab[2]) ** 2
        w = np.clip((radius - np.sqrt(d2)) / edge + 0.5, 0.0, 1.0)
        sub = hu[sl]
        if only_below is not None:
            w = np.where(sub < only_below, w, 0.0)
        sub += (value - sub) * w.astype(np.float32)


def _render_lesion(hu: np.ndarray, grid: _Grid, lesion: LesionPlan) -> np.ndarray:
    """Blend the lesion into ``hu``; return its mask (bool, grid shape)."""
    mask = np.zeros(grid.shape, dtype=bool)
    for centre, r in lesion.nodes:  # lymph nodes: not part of the annotated lesion
        _stamp_capsule(hu, grid, centre, centre, r, 45.0)
    reach = lesion.radius * (1.0 + sum(a for _, a in lesion.lobes)) + float(grid.spacing.max())
    c = lesion.center
    sl = grid.index_range(c - reach, c + reach)
    if sl is not None:
        zz, yy, xx = grid.local(sl)
        dx, dy, dz = xx - c[0], yy - c[1], zz - c[2]
        dist = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-6
        r_eff = np.full(dist.shape, lesion.radius, dtype=np.float64)
        for d, amp in lesion.lobes:
            cosang = (dx * d[0] + dy * d[1] + dz * d[2]) / dist
            r_eff = r_eff + lesion.radius * amp * np.exp((cosang - 1.0) / 0.25)
        edge = max(float(min(grid.spacing[0], grid.spacing[2])) * 0.7, 0.5)
        w = np.clip((r_eff - dist) / edge + 0.5, 0.0, 1.0)
        if lesion.shell_hu is not None:
            wc = np.clip((lesion.core_fraction * r_eff - dist) / edge + 0.5, 0.0, 1.0)
            value = lesion.shell_hu + (lesion.solid_hu - lesion.shell_hu) * wc
        else:
            value = np.full(dist.shape, lesion.solid_hu)
        if lesion.necrosis is not None:
            wn = np.clip((lesion.necrosis * r_eff - dist) / edge + 0.5, 0.0, 1.0)
            value = value + (12.0 - value) * wn
        if lesion.cavity is not None:
            off, rc = lesion.cavity
            dcav = np.sqrt((dx - off[0]) ** 2 + (dy - off[1]) ** 2 + (dz - off[2]) ** 2)
            wcav = np.clip((rc - dcav) / edge + 0.5, 0.0, 1.0)
            value = value + (AIR_HU - value) * wcav
        sub = hu[sl]
        sub += ((value - sub) * w).astype(np.float32)
        mask[sl] = w >= 0.5
    if not mask.any():  # a lesion smaller than a voxel: mark the voxel holding its centre
        k = int(np.clip(np.argmin(np.abs(grid.z - c[2])), 0, grid.shape[0] - 1))
        j = int(np.argmin(np.abs(grid.y - c[1])))
        i = int(np.argmin(np.abs(grid.x - c[0])))
        mask[k, j, i] = True
        hu[k, j, i] = lesion.solid_hu
    for d, frac, r in lesion.spikes:  # spiculation into the surrounding lung, outside the annotation
        start = c + d * lesion.radius * 0.8
        end = c + d * lesion.radius * (1.0 + frac)
        _stamp_capsule(hu, grid, start, end, r, 0.0, only_below=-300.0)
    return mask


def render_patient(plan: PatientPlan) -> tuple[np.ndarray, np.ndarray]:
    """(HU int16 (K, J, I), lesion mask bool (K, J, I)) for a drawn patient."""
    grid = _Grid(plan)
    k_total = grid.shape[0]
    hu = np.empty(grid.shape, dtype=np.float32)
    chunk = max(1, int(4_000_000 // (grid.shape[1] * grid.shape[2])))
    for k0 in range(0, k_total, chunk):
        hu[k0 : k0 + chunk] = _render_background(plan, grid, k0, min(k_total, k0 + chunk))
    an = plan.anatomy
    for p0, p1, r in an.bronchi:
        _stamp_capsule(hu, grid, p0, p1, r + 1.5, 50.0, only_below=0.0)
        _stamp_capsule(hu, grid, p0, p1, r, AIR_HU)
    for p0, p1, r in an.vessels:
        _stamp_capsule(hu, grid, p0, p1, r, 180.0 if an.contrast else 40.0, only_below=-500.0)
    mask = _render_lesion(hu, grid, plan.lesion)

    # texture of the parenchyma and scanner noise, slice chunk by chunk
    rng = np.random.default_rng(np.random.SeedSequence([plan.seed & 0xFFFFFFFF, ord(plan.label), plan.number, 7]))
    sc = plan.scanner
    out = np.empty(grid.shape, dtype=np.int16)
    fov_mask = None
    if sc.padding_outside_fov:
        yy = (grid.y - sc.grid_center[1])[:, None]
        xx = (grid.x - sc.grid_center[0])[None, :]
        fov_mask = (xx * xx + yy * yy) > (0.5 * sc.fov) ** 2
    for k0 in range(0, k_total, chunk):
        k1 = min(k_total, k0 + chunk)
        block = hu[k0:k1]
        z = grid.z[k0:k1][:, None, None]
        tex = np.zeros(block.shape, dtype=np.float32)
        for kv, phase, amp in an.texture:
            tex += amp * np.cos(kv[0] * grid.x[None, None, :] + kv[1] * grid.y[None, :, None] + kv[2] * z + phase)
        lung_like = block < -400.0
        block += np.where(lung_like & (block > -990.0), tex, 0.0)
        block += rng.standard_normal(block.shape, dtype=np.float32) * np.float32(sc.noise_hu)
        np.clip(block, -1024.0, 3071.0, out=block)
        if fov_mask is not None:
            block[:, fov_mask] = _PADDING_HU
        out[k0:k1] = np.rint(block).astype(np.int16)
    return out, mask


def _box_from_mask(mask: np.ndarray) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    k_idx, j_idx, i_idx = (np.nonzero(mask.any(axis=a))[0] for a in ((1, 2), (0, 2), (0, 1)))
    return (
        (int(i_idx[0]), int(j_idx[0]), int(k_idx[0])),
        (int(i_idx[-1]), int(j_idx[-1]), int(k_idx[-1])),
    )


def _box_ras(affine: np.ndarray, box_ijk) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    lo, hi = np.array(box_ijk[0], float), np.array(box_ijk[1], float)
    corners = np.array([[a, b, c, 1.0] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    ras = (corners @ affine.T)[:, :3]
    return tuple(float(v) for v in ras.min(axis=0)), tuple(float(v) for v in ras.max(axis=0))  # type: ignore[return-value]


def _scanner_info(sc: ScannerPlan) -> dict[str, Any]:
    return {
        "manufacturer": sc.manufacturer,
        "model": sc.model_name,
        "series_description": sc.series_description,
        "kernel": sc.kernel,
        "slice_thickness": sc.slice_thickness,
        "pixel_spacing": sc.pixel_spacing,
        "fov": sc.fov,
    }


def make_case(
    label: str,
    seed: int,
    size: int = 128,
    *,
    number: int = 1,
    small_lesion_share: float = DEFAULT_SMALL_LESION_SHARE,
    evidence: EvidenceDesign = DEFAULT_EVIDENCE,
) -> SyntheticCase:
    """One phantom patient in memory (no files): CT in HU, clinical record and lesion truth."""
    plan = draw_patient(label, seed, number, size, small_lesion_share, evidence)
    hu, mask = render_patient(plan)
    affine = plan_ijk_to_ras(plan)
    box_ijk = _box_from_mask(mask)
    box_ras = _box_ras(affine, box_ijk)
    center = plan.lesion.center + np.array([0.0, 0.0, plan.anatomy.body_z0])
    sc = plan.scanner
    volume = Volume(
        hu,
        affine,
        {
            "modality": "CT",
            "series_uid": None,
            "patient_sex": plan.record["sex"],
            "patient_age": None if plan.record["age"] is None else float(plan.record["age"]),
            "patient_weight": plan.record["weight"],
            "source": f"synthetic:{plan.patient_id}:seed={seed}",
            "warnings": [],
            "synthetic": True,
        },
    )
    return SyntheticCase(
        label=plan.label,
        patient_id=plan.patient_id,
        volume=volume,
        record=dict(plan.record),
        lesion_box_ras=box_ras,
        lesion_center_ras=tuple(float(v) for v in center),  # type: ignore[arg-type]
        lesion_box_ijk=box_ijk,
        lesion_mask=mask,
        lesion_diameter_mm=plan.lesion.diameter_mm,
        lesion_kind=plan.lesion.kind,
        evidence={"image_typical": plan.image_typical, "record_typical": plan.record_typical},
        sheet_row=dict(plan.sheet_row),
        scanner=_scanner_info(sc),
    )

