"""Lesion-guided runs resample only the region their windows cover: same windows, same result."""

from __future__ import annotations

import numpy as np
import pytest
from test_inference_support import write_untrained_checkpoint

from MMCAFNetLib.inference import Predictor
from MMCAFNetLib.synthetic import make_case
from MMCAFNetLib.volume import Volume

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    return Predictor.load(write_untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "u.pt"), device="cpu")


def _oblique(volume: Volume) -> Volume:
    angle = np.deg2rad(12.0)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    m = volume.ijk_to_ras.copy()
    m[:3, :3] = rot @ m[:3, :3]
    return Volume(volume.array, m, dict(volume.meta))


@pytest.mark.parametrize("oblique", [False, True])
def test_region_and_whole_ct_preparation_agree(predictor, oblique):
    case = make_case("G", 21, 96)
    ct = _oblique(case.volume) if oblique else case.volume
    box = case.lesion_box_ras
    if oblique:  # the lesion's box moves with the grid: take the rotated corners' bounds
        corners = case.volume.ras_to_ijk_points(np.array([[x, y, z] for x in (box[0][0], box[1][0])
                                                           for y in (box[0][1], box[1][1])
                                                           for z in (box[0][2], box[1][2])]))
        ras = ct.ijk_to_ras_points(corners)
        box = (ras.min(axis=0), ras.max(axis=0))
    lesion = np.array(box)
    predictor.crop_to_lesion = True
    region = predictor.classify(ct, case.record, lesion=lesion, heatmap="attention")
    predictor.crop_to_lesion = False
    try:
        whole = predictor.classify(ct, case.record, lesion=lesion, heatmap="attention")
    finally:
        predictor.crop_to_lesion = True
    np.testing.assert_allclose([w.center_ras for w in region.windows], [w.center_ras for w in whole.windows], atol=1e-6)
    np.testing.assert_allclose(region.probabilities, whole.probabilities, rtol=1e-4, atol=1e-5)
    assert region.heatmap.same_geometry(ct) and region.labelmap.same_geometry(ct)
    np.testing.assert_allclose(region.heatmap.array, whole.heatmap.array, atol=2e-3)
    assert np.mean((region.heatmap.array > 0) != (whole.heatmap.array > 0)) < 1e-4
