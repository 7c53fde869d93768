"""Draw the module icon and render the catalog screenshot (maintainer tool, needs matplotlib).

    python MMCAFNet/Testing/Python/make_artwork.py icon
    python MMCAFNet/Testing/Python/make_artwork.py screenshot [--checkpoint CKPT]

The "screenshot" is a rendering, not a picture of Slicer (none exists yet), and says so in a
footer: a real run, a synthetic case classified by the bundled demo model (or CKPT), written into
Slicer's MRML scene by MMCAFNetLib.scene when slicer-core is installed, and drawn with matplotlib
from the output nodes: CT slice, heatmap overlay (Inferno, opacity 0.4, low values hidden), the
labelmap's contour and the probability table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
ICON = ROOT / "Resources" / "Icons" / "MMCAFNet.png"
SCREENSHOT = ROOT / "Resources" / "Screenshots" / "MMCAFNet-screenshot.png"


def draw_icon(path: Path = ICON) -> Path:
    """Two lungs on a dark rounded tile with a warm attention glow over a lesion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch, PathPatch
    from matplotlib.path import Path as MPath

    fig = plt.figure(figsize=(1.28, 1.28), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")
    fig.patch.set_alpha(0)
    ax.add_patch(FancyBboxPatch((0.03, 0.03), 0.94, 0.94, boxstyle="round,pad=0,rounding_size=0.18",
                                facecolor="#14213d", edgecolor="none"))

    def lung(mirror: bool) -> MPath:
        pts = np.array([
            (0.46, 0.78), (0.40, 0.84), (0.28, 0.80), (0.19, 0.62), (0.14, 0.42), (0.15, 0.22),
            (0.24, 0.15), (0.36, 0.17), (0.44, 0.24), (0.47, 0.40), (0.47, 0.60), (0.46, 0.78),
        ])
        if mirror:
            pts[:, 0] = 1.0 - pts[:, 0]
        codes = [MPath.MOVETO] + [MPath.CURVE4] * 9 + [MPath.LINETO, MPath.CLOSEPOLY]
        return MPath(pts, codes[: len(pts)])

    for mirror in (False, True):
        ax.add_patch(PathPatch(lung(mirror), facecolor="#8ecae6", edgecolor="#e0f2fb", lw=1.2, alpha=0.95))
    # trachea and bronchi
    ax.plot([0.5, 0.5], [0.93, 0.66], color="#e0f2fb", lw=3.2, solid_capstyle="round")
    ax.plot([0.5, 0.40, 0.36], [0.66, 0.58, 0.50], color="#e0f2fb", lw=2.0, solid_capstyle="round")
    ax.plot([0.5, 0.60, 0.64], [0.66, 0.58, 0.50], color="#e0f2fb", lw=2.0, solid_capstyle="round")
    # attention glow: stacked translucent discs in Inferno colours over a lesion in the right lung
    import matplotlib.cm as cm

    centre = (0.70, 0.36)
    for r, level in zip(np.linspace(0.20, 0.03, 12), np.linspace(0.35, 0.98, 12)):
        ax.add_patch(plt.Circle(centre, r, color=cm.inferno(level), alpha=0.22, lw=0))
    ax.add_patch(plt.Circle(centre, 0.035, color="#fff3b0", lw=0))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, transparent=True)
    plt.close(fig)
    return path


def classify_case(checkpoint: str | None, seed: int = 11):
    """A synthetic case classified by the real Predictor; outputs written through a real MRML scene."""
    from MMCAFNetLib.inference import Predictor
    from MMCAFNetLib.resources import demo_checkpoint_path
    from MMCAFNetLib.synthetic import make_case

    case = make_case("A", seed, size=128)
    predictor = Predictor.load(checkpoint or demo_checkpoint_path(), device="cpu")
    result = predictor.classify(case.volume, case.record, lesion=np.asarray(case.lesion_center_ras), heatmap="model")
    return case, result


def scene_arrays(case, result):
    """Round-trip through Slicer's MRML scene when slicer-core is present (what the module shows)."""
    import importlib.util
    import types

    if importlib.util.find_spec("slicer") is None:
        return case.volume.array, result.heatmap.array, result.labelmap.array, None
    import slicer

    from MMCAFNetLib import scene as mscene

    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    app.GetColorLogic().SetMRMLScene(scene)
    app.GetColorLogic().AddDefaultColorNodes()
    seg_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    seg_logic.SetMRMLScene(scene)
    seg_logic.SetMRMLApplicationLogic(app)
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(segmentations=types.SimpleNamespace(logic=lambda: seg_logic))
    ct = slicer.util.addVolumeFromArray(np.ascontiguousarray(case.volume.array), case.volume.ijk_to_ras, "CT")
    out = mscene.write_outputs(ct, result)
    table = out.table.GetTable()
    rows = [(table.GetValue(r, 1).ToString(), table.GetValue(r, 2).ToDouble()) for r in range(table.GetNumberOfRows())]
    return (slicer.util.arrayFromVolume(ct), slicer.util.arrayFromVolume(out.heatmap).copy(),
            slicer.util.arrayFromVolume(out.labelmap).copy(), rows)


def render_screenshot(checkpoint: str | None = None, path: Path = SCREENSHOT) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    case, result = classify_case(checkpoint)
    ct, heat, labels, rows = scene_arrays(case, result)
    if rows is None:
        rows = list(zip(result.class_labels, result.probabilities))
    k = round(case.volume.ras_to_ijk_points(case.lesion_center_ras)[0][2])
    fig = plt.figure(figsize=(12, 5.4), dpi=110, facecolor="#1e1e1e")
    views = [("Axial", ct[k], heat[k], labels[k])]
    j = round(case.volume.ras_to_ijk_points(case.lesion_center_ras)[0][1])
    views.append(("Coronal", ct[:, j, :], heat[:, j, :], labels[:, j, :]))
    for n, (title, img, hm, lab) in enumerate(views):
        ax = fig.add_axes([0.01 + n * 0.33, 0.06, 0.32, 0.86])
        spacing = case.volume.spacing
        aspect = spacing[1] / spacing[0] if title == "Axial" else spacing[2] / spacing[0]
        origin = "upper" if title == "Axial" else "lower"  # coronal: superior (high k) at the top
        ax.imshow(np.clip((img + 1000) / 1400, 0, 1), cmap="gray", aspect=aspect, origin=origin)
        shown = np.ma.masked_less(hm, result.threshold * 0.6)
        ax.imshow(shown, cmap="inferno", vmin=0, vmax=1, alpha=0.4, aspect=aspect, origin=origin)
        if lab.any():
            ax.contour(lab > 0, levels=[0.5], colors=["#e65933"], linewidths=1.6, origin=origin)
        ax.set_title(title, color="#dddddd", fontsize=11)
        ax.axis("off")
    tab = fig.add_axes([0.69, 0.10, 0.30, 0.78])
    tab.axis("off")
    tab.set_title("MMCAF-Net probabilities", color="#dddddd", fontsize=11)
    cells = [[label, f"{100 * p:.1f}%"] for label, p in rows]
    table = tab.table(cellText=cells, colLabels=["class", "probability"], loc="upper center", cellLoc="left")
    table.scale(1, 1.8)
    for (r, _c), cell in table.get_celld().items():
        cell.set_facecolor("#2b2b2b" if r else "#3c3c3c")
        cell.set_edgecolor("#555555")
        cell.get_text().set_color("#f0f0f0")
        if r and rows[r - 1][0] == result.predicted_label:
            cell.get_text().set_color("#ffb347")
            cell.get_text().set_fontweight("bold")
    verdict = f"{result.predicted_label}: {100 * result.probability:.1f}%"
    tab.text(0.5, 0.30, verdict, color="#ffb347", fontsize=13, ha="center", weight="bold", transform=tab.transAxes)
    if result.model.get("demo"):
        tab.text(0.5, 0.18, "DEMO model, synthetic case: not a diagnosis", color="#ff6b6b", fontsize=9,
                 ha="center", transform=tab.transAxes)
    # The Extensions catalog shows this picture without a caption: it says itself what it is.
    fig.text(0.01, 0.015, "Rendering of the module's outputs written into Slicer's MRML scene; not a screenshot "
             "of Slicer", color="#9a9a9a", fontsize=8, ha="left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, facecolor=fig.get_facecolor())
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["icon", "screenshot"])
    parser.add_argument("--checkpoint", help="model to classify with (default: the bundled demo model)")
    args = parser.parse_args(argv)
    print(draw_icon() if args.what == "icon" else render_screenshot(args.checkpoint))
    return 0


if __name__ == "__main__":
    sys.exit(main())
