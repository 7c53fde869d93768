"""Result folders of the command line loaded back into slicer-core's real MRML scene in one call:
`slicer_logic.load_results` (CT named in prediction.json, a given CT, a demo folder, a batch) and the
clear refusals of folders that cannot be loaded."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML libraries) is not installed")

from test_inference_support import write_untrained_checkpoint  # noqa: E402

from MMCAFNetLib import scene as mscene  # noqa: E402
from MMCAFNetLib.cli import main  # noqa: E402
from MMCAFNetLib.inference.result_folder import ResultFolderError, read_heatmap  # noqa: E402
from MMCAFNetLib.slicer_logic import LoadedResult, load_results  # noqa: E402
from MMCAFNetLib.slicer_setup import Panel  # noqa: E402
from MMCAFNetLib.synthetic import make_case  # noqa: E402
from MMCAFNetLib.volume import Volume, read_volume, write_volume  # noqa: E402

pytestmark = [pytest.mark.scene, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    """A CT file and the folder `mmcafnet predict` wrote for it (run from another working directory)."""
    root = tmp_path_factory.mktemp("predicted")
    ckpt = write_untrained_checkpoint(root / "untrained.pt")
    case = make_case("G", 5, 80)
    write_volume(case.volume, root / "case.nrrd")
    out = root / "result"
    point = [f"{v:.4f}" for v in case.lesion_center_ras]
    assert main(["predict", "--checkpoint", str(ckpt), "--input", str(root / "case.nrrd"), "--out", str(out),
                 "--point", *point, "--no-preview"]) == 0
    return root, ckpt, out, point


def check_styled_as_a_live_run(loaded: LoadedResult, folder) -> None:
    prediction = json.loads((folder / "prediction.json").read_text())
    outputs, ct = loaded.outputs, loaded.ct_node
    table = outputs.table.GetTable()
    assert table.GetNumberOfRows() == len(prediction["class_names"])
    for row, name in enumerate(prediction["class_names"]):
        assert table.GetValue(row, 2).ToDouble() == pytest.approx(prediction["probabilities"][name], abs=1e-6)
    assert outputs.table.GetAttribute("MMCAFNet.PredictedClass") == prediction["predicted_class"]
    heat = read_heatmap(folder / "heatmap.nrrd")
    np.testing.assert_allclose(slicer.util.arrayFromVolume(outputs.heatmap), heat.array, atol=1e-6)
    for node in (outputs.heatmap, outputs.labelmap):
        np.testing.assert_allclose(mscene.node_ijk_to_ras(node), mscene.node_ijk_to_ras(ct), atol=1e-9)
    display = outputs.heatmap.GetDisplayNode()
    assert "Inferno" in display.GetColorNode().GetName()
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(prediction["heatmap_threshold"])
    assert display.GetOpacity() == pytest.approx(mscene.HEATMAP_OPACITY)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(outputs.labelmap), read_volume(folder / "labelmap.nrrd").array)
    segment = outputs.segmentation.GetSegmentation().GetNthSegment(0)
    assert segment.GetName() == prediction["predicted_label"]
    assert set(mscene.find_outputs(ct)) == set(outputs.nodes())
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(ct.GetScene())
    parent = sh.GetItemParent(sh.GetItemByDataNode(ct))
    assert all(sh.GetItemParent(sh.GetItemByDataNode(n)) == parent for n in outputs.nodes())


def test_a_predict_folder_loads_with_the_ct_it_names(mrml_scene, predicted, monkeypatch, tmp_path) -> None:
    root, _, out, _ = predicted
    monkeypatch.chdir(tmp_path)  # the CT is found from prediction.json's path, not from the working directory
    loaded = load_results(out)
    assert isinstance(loaded, LoadedResult)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(loaded.ct_node), read_volume(root / "case.nrrd").array)
    check_styled_as_a_live_run(loaded, out)
    # Loading again finds the CT it loaded and replaces the outputs: nothing is added.
    count = mrml_scene.GetNumberOfNodes()
    again = load_results(out)
    assert again.ct_node is loaded.ct_node and mrml_scene.GetNumberOfNodes() == count


def test_a_given_ct_is_used_when_the_results_lie_on_it_and_refused_otherwise(mrml_scene, predicted) -> None:
    root, _, out, _ = predicted
    ct = read_volume(root / "case.nrrd")
    node = slicer.util.addVolumeFromArray(np.ascontiguousarray(ct.array), ct.ijk_to_ras, "my CT")
    loaded = load_results(out, node)
    assert loaded.ct_node is node
    check_styled_as_a_live_run(loaded, out)

    other = slicer.util.addVolumeFromArray(np.ascontiguousarray(ct.array[:-2]), ct.ijk_to_ras, "another CT")
    count = mrml_scene.GetNumberOfNodes()
    with pytest.raises(mscene.SceneError, match="another grid"):
        load_results(out, other)
    assert mrml_scene.GetNumberOfNodes() == count
    # The panel's button: the selected CT when the results fit it, else the CT the folder names.
    assert Panel.load_results(str(out), node).startswith("Loaded result:")
    assert mscene.find_outputs(node)
    Panel.load_results(str(out), other)
    assert not mscene.find_outputs(other)


def test_a_demo_folder_loads_its_own_ct(mrml_scene, predicted, tmp_path) -> None:
    _, ckpt, _, _ = predicted
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--checkpoint", str(ckpt), "--size", "64", "--label", "A"]) == 0
    loaded = load_results(out)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(loaded.ct_node), read_volume(out / "ct.nrrd").array)
    check_styled_as_a_live_run(loaded, out)


def test_a_batch_folder_loads_every_case_with_its_ct(mrml_scene, predicted, tmp_path) -> None:
    _, ckpt, _, _ = predicted
    cts = tmp_path / "cts"
    cts.mkdir()
    for letter, seed in (("A", 1), ("G", 2)):
        write_volume(make_case(letter, seed, 64).volume, cts / f"{letter}{seed}.nrrd")
    out = tmp_path / "batch"
    assert main(["predict", "--checkpoint", str(ckpt), "--batch", str(cts), "--out", str(out), "--no-preview"]) == 0
    loaded = load_results(out)
    assert [item.folder.name for item in loaded] == ["A1", "G2"]
    assert len({item.ct_node.GetID() for item in loaded}) == 2
    for item in loaded:
        check_styled_as_a_live_run(item, item.folder)
    with pytest.raises(mscene.SceneError, match="batch folder"):
        load_results(out, loaded[0].ct_node)


def test_folders_that_cannot_be_loaded_say_why_and_change_nothing(mrml_scene, predicted, tmp_path) -> None:
    _, _, out, _ = predicted
    count = mrml_scene.GetNumberOfNodes()
    with pytest.raises(FileNotFoundError, match="not found"):
        load_results(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ResultFolderError, match="is a file"):
        load_results(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ResultFolderError, match=r"no prediction\.json"):
        load_results(tmp_path / "empty")

    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    text = (bad / "prediction.json").read_text()
    (bad / "prediction.json").write_text(text.replace('"probability": ', '"probability": NaN, "was": ', 1))
    with pytest.raises(ResultFolderError, match="not valid JSON"):
        load_results(bad)
    (bad / "prediction.json").write_text(json.dumps({"predicted_class": "A"}))
    with pytest.raises(ResultFolderError, match="lacks class_names, probabilities"):
        load_results(bad)

    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    data = json.loads((moved / "prediction.json").read_text())
    data["input"] = str(tmp_path / "gone.nrrd")
    (moved / "prediction.json").write_text(json.dumps(data))
    with pytest.raises(ResultFolderError, match=r"CT of .* is not found"):
        load_results(moved)

    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    labels = read_volume(mixed / "labelmap.nrrd")
    write_volume(Volume(labels.array[1:], labels.ijk_to_ras), mixed / "labelmap.nrrd")
    with pytest.raises(ResultFolderError, match="different grids"):
        load_results(mixed)
    assert mrml_scene.GetNumberOfNodes() == count
