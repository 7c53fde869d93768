"""Shared pytest fixtures."""

import types

import pytest


@pytest.fixture
def mrml_scene():
    """Slicer's real MRML scene (slicer-core wheel) with the colour, volumes and segmentations logics.

    slicer.util looks up ``slicer.mrmlScene`` and ``slicer.modules``, so they are set for the test
    and removed afterwards.
    """
    slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML libraries) is not installed")
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    app_logic.GetColorLogic().SetMRMLScene(scene)
    app_logic.GetColorLogic().AddDefaultColorNodes()
    app_logic.SetModuleLogic("Colors", app_logic.GetColorLogic())

    def register(logic):
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app_logic)
        return logic

    segmentations = register(slicer.vtkSlicerSegmentationsModuleLogic())
    volumes = register(slicer.vtkSlicerVolumesLogic())
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(
        segmentations=types.SimpleNamespace(logic=lambda: segmentations),
        volumes=types.SimpleNamespace(logic=lambda: volumes),
    )
    yield scene
    scene.Clear(1)
    del slicer.mrmlScene, slicer.modules


@pytest.fixture
def one_torch_thread():
    """Many small torch ops run far faster on one thread than on two when the cores are shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
