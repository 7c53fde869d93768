"""MMCAFNet/MMCAFNet.py on Slicer 5.10's own Python layer (parameterNodeWrapper, ScriptedLoadableModule)
over slicer-core's real MRML scene: the parameter node, the Logic and the self-test's logic path.

The module file is imported as Slicer imports it (see slicer_layer_support); only Qt is stood in for,
and only while the files are imported. What needs a running Qt (the widget) is not exercised here.
"""

from __future__ import annotations

import json
import sys
import time
import types
import unittest
from pathlib import Path

import numpy as np
import pytest
from slicer_layer_support import MODULE_FILE, cmake_category, require_slicer_layer, slicer_layer

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML libraries) is not installed")

from MMCAFNetLib import scene as mscene  # noqa: E402
from MMCAFNetLib.model_catalog import MODELS_DIR_ENV  # noqa: E402
from MMCAFNetLib.slicer_setup import add_demo_case  # noqa: E402

pytestmark = pytest.mark.scene

LESION_CLASSES = ("vtkMRMLMarkupsFiducialNode", "vtkMRMLMarkupsROINode", "vtkMRMLSegmentationNode")


@pytest.fixture(scope="module")
def slicer_module():
    """MMCAFNet.py as Slicer imports it; sys.modules and the slicer package restored afterwards."""
    require_slicer_layer()
    with slicer_layer() as module:
        yield module


def wait_for(job, timeout: float = 300.0):
    """Poll a job the way the widget's 100 ms timer does, until it is done."""
    deadline = time.monotonic() + timeout
    while not job.poll():
        assert time.monotonic() < deadline, f"job still running after {timeout} s"
        time.sleep(0.1)
    return job


def outputs_of(ct) -> dict[str, object]:
    return {node.GetAttribute(mscene.ROLE_ATTRIBUTE): node for node in mscene.find_outputs(ct)}


# ----------------------------------------------------------------------------------------------
# Importing the module file
# ----------------------------------------------------------------------------------------------


def test_the_module_file_imports_on_slicers_layer_with_qt_stood_in_for_only_at_import(slicer_module):
    assert slicer_module.__name__ == "MMCAFNet" and Path(slicer_module.__file__) == MODULE_FILE
    assert "qt" not in sys.modules and "ctk" not in sys.modules  # gone again after the import
    assert not hasattr(slicer, "qMRMLNodeComboBox")
    wrapper = sys.modules["slicer.parameterNodeWrapper"]
    assert "third_party" in Path(wrapper.__file__).parts  # Slicer's own copy, not a stand-in
    assert slicer.ScriptedLoadableModule.ScriptedLoadableModuleLogic in slicer_module.MMCAFNetLogic.__mro__


def test_the_loader_leaves_sys_modules_and_the_slicer_package_as_they_were():
    require_slicer_layer()
    modules_before, attributes_before = set(sys.modules), set(vars(slicer))
    with slicer_layer() as module:
        assert sys.modules["MMCAFNet"] is module and hasattr(slicer, "parameterNodeWrapper")
    added = {n for n in set(sys.modules) - modules_before if not n.startswith("MMCAFNetLib")}
    assert not added, f"left behind: {sorted(added)}"
    assert set(vars(slicer)) == attributes_before


def test_the_module_class_declares_its_own_category_and_registers_its_self_test(slicer_module, monkeypatch):
    """Runs the real ScriptedLoadableModule.__init__; its i18n.tr needs slicer.app.translate (identity)."""
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(translate=lambda context, text: text), raising=False)
    monkeypatch.setattr(slicer, "selfTests", {}, raising=False)
    parent = types.SimpleNamespace(path=str(MODULE_FILE))
    module = slicer_module.MMCAFNet(parent)
    assert parent.categories == [cmake_category()] == ["Quantification"]
    assert "arXiv:2508.04205" in parent.helpText and "Research use only" in parent.helpText
    assert parent.title.startswith("MMCAF-Net")
    assert slicer.selfTests["MMCAFNet"] == module.runTest


# ----------------------------------------------------------------------------------------------
# The parameter node, on the real scene
# ----------------------------------------------------------------------------------------------


def test_the_parameter_node_builds_with_its_defaults(slicer_module, mrml_scene):
    """Slicer's wrapper writes every default when it is built: lesion None must be writable."""
    logic = slicer_module.MMCAFNetLogic()
    p = logic.getParameterNode()
    assert (p.inputVolume, p.lesion) == (None, None)
    assert (p.modelId, p.device, p.heatmapMethod) == (slicer_module.DEMO_MODEL_ID, "auto", "model")
    assert (p.heatmapThreshold, p.showOutputs, p.clinicalRecord) == (0.5, True, "{}")
    node = p.parameterNode
    assert node.IsA("vtkMRMLScriptedModuleNode") and node.GetAttribute("ModuleName") == "MMCAFNet"
    assert logic.getParameterNode().parameterNode is node  # one singleton per scene
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1


@pytest.mark.parametrize("class_name", [*LESION_CLASSES, None])
def test_every_lesion_kind_round_trips(slicer_module, mrml_scene, class_name):
    p = slicer_module.MMCAFNetLogic().getParameterNode()
    lesion = mrml_scene.AddNewNodeByClass(class_name, "Lesion") if class_name else None
    p.lesion = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Earlier")  # something to replace
    p.lesion = lesion
    assert p.lesion is lesion
    assert slicer_module.MMCAFNetParameterNode(p.parameterNode).lesion is lesion  # read back from MRML
    p.lesion = None
    assert slicer_module.MMCAFNetParameterNode(p.parameterNode).lesion is None


def test_the_lesion_refuses_other_node_kinds(slicer_module, mrml_scene):
    p = slicer_module.MMCAFNetLogic().getParameterNode()
    point = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    p.lesion = point
    for class_name in ("vtkMRMLScalarVolumeNode", "vtkMRMLMarkupsLineNode", "vtkMRMLModelNode"):
        with pytest.raises(TypeError):
            p.lesion = mrml_scene.AddNewNodeByClass(class_name)
        assert p.lesion is point


def test_ranges_and_choices_refuse_what_the_panel_does_not_offer(slicer_module, mrml_scene):
    p = slicer_module.MMCAFNetLogic().getParameterNode()
    for value in (0.0, 1.0, 0.25):
        p.heatmapThreshold = value
        assert p.heatmapThreshold == value
    for value in (-0.01, 1.01, 5.0):
        with pytest.raises(ValueError):
            p.heatmapThreshold = value
        assert p.heatmapThreshold == 0.25
    for name, bad, good in (("device", "tpu", "cuda"), ("heatmapMethod", "cam", "gradcam")):
        setattr(p, name, good)
        with pytest.raises(ValueError):
            setattr(p, name, bad)
        assert getattr(p, name) == good
    with pytest.raises(TypeError):
        p.inputVolume = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")


def fill_every_field(p, scene):
    ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Lesion box")
    record = {"sex": "F", "age": 71.5, "m_stage": "1a", "note": "Ｍ-Stage, ÄÖÜ"}
    values = {"inputVolume": ct, "lesion": roi, "modelId": "/models/user model.pt", "device": "cpu",
              "heatmapMethod": "gradcam", "heatmapThreshold": 0.35, "showOutputs": False,
              "clinicalRecord": json.dumps(record, ensure_ascii=False)}
    for name, value in values.items():
        setattr(p, name, value)
    return values


def test_every_field_survives_rewrapping_and_a_scene_save_and_reload(slicer_module, mrml_scene, tmp_path):
    p = slicer_module.MMCAFNetLogic().getParameterNode()
    values = fill_every_field(p, mrml_scene)
    again = slicer_module.MMCAFNetParameterNode(p.parameterNode)
    assert {name: getattr(again, name) for name in values} == values

    mrml_scene.SetURL(str(tmp_path / "scene.mrml"))
    assert mrml_scene.Commit()
    reloaded = slicer.vtkMRMLScene()
    reloaded.SetURL(str(tmp_path / "scene.mrml"))
    assert reloaded.Import()
    try:
        node = reloaded.GetSingletonNode("MMCAFNet", "vtkMRMLScriptedModuleNode")
        assert node is not None and node is not p.parameterNode
        back = slicer_module.MMCAFNetParameterNode(node)
        for name, value in values.items():
            if hasattr(value, "GetID"):  # a node: the reloaded scene's copy of it
                assert getattr(back, name).GetScene() is reloaded
                assert (getattr(back, name).GetID(), getattr(back, name).GetName()) == (value.GetID(), value.GetName())
            else:
                assert getattr(back, name) == value, name
        assert json.loads(back.clinicalRecord)["note"] == "Ｍ-Stage, ÄÖÜ"
    finally:
        reloaded.Clear(1)


# ----------------------------------------------------------------------------------------------
# The Logic
# ----------------------------------------------------------------------------------------------


def test_models_folder_follows_the_environment_else_the_home_folder(slicer_module, monkeypatch, tmp_path):
    logic_class = slicer_module.MMCAFNetLogic
    monkeypatch.setenv(MODELS_DIR_ENV, str(tmp_path / "mine"))
    assert logic_class.modelsFolder() == str(tmp_path / "mine")
    monkeypatch.delenv(MODELS_DIR_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert not hasattr(slicer, "app")  # outside the application: no user settings folder
    assert logic_class.modelsFolder() == str(tmp_path / "MMCAFNet" / "models")
    assert str(logic_class().panel.models.folder) == logic_class.modelsFolder()


def test_missing_dependencies_are_found_without_importing_them(slicer_module, monkeypatch):
    logic_class = slicer_module.MMCAFNetLogic
    assert logic_class.missingDependencies() == []  # torch and pandas are installed here
    monkeypatch.setitem(sys.modules, "torch", None)  # what a Slicer without the PyTorch extension sees
    assert logic_class.missingDependencies() == ["torch"]
    monkeypatch.setitem(sys.modules, "pandas", None)
    assert logic_class.missingDependencies() == ["torch", "pandas"]


def test_the_panels_path_from_parameter_node_to_outputs(slicer_module, mrml_scene):
    """As the widget runs it: options from the parameter node and model entry, start, poll, summary."""
    logic = slicer_module.MMCAFNetLogic()
    ct, point, record = add_demo_case(seed=11, size=48)
    roi = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Lesion box")
    roi.SetCenter(*slicer.util.arrayFromMarkupsControlPoints(point)[0])
    roi.SetSize(30.0, 30.0, 30.0)
    p = logic.getParameterNode()
    p.inputVolume, p.lesion, p.device, p.heatmapMethod, p.heatmapThreshold = ct, roi, "cpu", "gradcam", 0.3
    entries = logic.panel.models.entries()
    demo = entries[logic.panel.models.index(entries, p.modelId)]
    options = logic.panel.options(p, demo)
    assert (options.device, options.heatmap, options.threshold, options.show) == ("cpu", "gradcam", 0.3, True)
    assert Path(options.model_path) == logic.panel.models.path(demo)

    job = wait_for(logic.start(p.inputVolume, record, p.lesion, options))
    assert job.error is None and not job.cancelled and job.result.model.get("demo")
    written = outputs_of(ct)
    assert set(written) == {"table", "heatmap", "labelmap", "segmentation", "candidates"}
    places = written["candidates"]  # the worker's candidates, through the job files, as points
    assert places.GetNumberOfControlPoints() == len(job.result.candidates) >= 1
    for n, candidate in enumerate(job.result.candidates):
        position = [0.0, 0.0, 0.0]
        places.GetNthControlPointPositionWorld(n, position)
        assert np.allclose(position, candidate.ras, atol=1e-4) and places.GetNthControlPointLabel(n) == str(n + 1)
    assert written["heatmap"].GetAttribute("MMCAFNet.Threshold") == "0.3"
    assert written["heatmap"].GetDisplayNode().GetLowerThreshold() == pytest.approx(0.3)
    summary = logic.panel.job_summary(job)
    assert summary.startswith(job.result.predicted_label) and "DEMO MODEL" in summary and summary.endswith(" s)")
    count = len(job.result.candidates)
    assert (f"heatmap peaks marked 1-{count}" if count > 1 else "heatmap peak marked 1") in summary


def test_logic_classify_blocks_and_replaces_its_outputs(slicer_module, mrml_scene):
    logic = slicer_module.MMCAFNetLogic()
    ct, point, record = add_demo_case(seed=5, size=48)
    before = slicer.util.arrayFromVolume(ct).copy()
    result, outputs = logic.classify(ct, record, point, logic.panel.options(device="cpu"))
    assert result.model.get("demo") and float(np.sum(result.probabilities)) == pytest.approx(1.0, abs=1e-4)
    assert {n.GetID() for n in outputs.nodes()} == {n.GetID() for n in outputs_of(ct).values()}
    count = mrml_scene.GetNumberOfNodes()
    logic.classify(ct, record, None, logic.panel.options(device="cpu", heatmap="none"))  # whole CT, no map
    assert mrml_scene.GetNumberOfNodes() < count  # the heatmap, labelmap and segmentation went
    assert set(outputs_of(ct)) == {"table"}
    assert np.array_equal(before, slicer.util.arrayFromVolume(ct))


# ----------------------------------------------------------------------------------------------
# The self-test's logic path
# ----------------------------------------------------------------------------------------------


def self_test(slicer_module):
    test = slicer_module.MMCAFNetTest()
    shown: list[str] = []
    test.delayDisplay = lambda message, *args, **kwargs: shown.append(message)  # no Qt to show it in
    return test, shown


def test_the_self_test_classifies_the_demo_case(slicer_module, mrml_scene):
    test, shown = self_test(slicer_module)
    mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "left over")  # setUp clears the scene
    test.runTest()
    assert shown[-1] == "MMCAF-Net self-test passed"
    assert mrml_scene.GetFirstNodeByName("left over") is None
    (ct,) = mscene.ct_volume_nodes(mrml_scene)
    assert set(outputs_of(ct)) == {"table", "heatmap", "labelmap", "segmentation", "candidates"}


def test_the_self_test_skips_without_torch_and_never_installs(slicer_module, mrml_scene, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the self-test must never install anything")

    monkeypatch.setitem(sys.modules, "torch", None)  # torch not installed
    monkeypatch.setattr(slicer.util, "pip_install", refuse)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=refuse))
    test, shown = self_test(slicer_module)
    with pytest.raises(unittest.SkipTest, match="torch not installed"):
        test.test_DemoModelOnSyntheticCase()
    test.runTest()  # Slicer's Test button: a message, not a failure
    assert shown[-1].startswith("MMCAF-Net self-test skipped: torch not installed")
    assert mscene.ct_volume_nodes(mrml_scene) == []
