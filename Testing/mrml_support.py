"""Slicer's real MRML scene (slicer-core wheel) set up as the module's code expects it: the colour,
volumes and segmentations logics registered, ``slicer.mrmlScene`` and ``slicer.modules`` set (slicer.util
looks them up). Used by the tests' ``mrml_scene`` fixture and by the benchmark's W7."""

from __future__ import annotations

import types
from typing import Any


def open_scene() -> Any:
    """A new scene with the logics registered, installed as ``slicer.mrmlScene``."""
    import slicer

    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    app_logic.GetColorLogic().SetMRMLScene(scene)
    app_logic.GetColorLogic().AddDefaultColorNodes()
    app_logic.SetModuleLogic("Colors", app_logic.GetColorLogic())

    def register(logic: Any) -> Any:
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
    return scene


def close_scene(scene: Any) -> None:
    """Clear the scene and remove the globals :func:`open_scene` set."""
    import slicer

    scene.Clear(1)
    del slicer.mrmlScene, slicer.modules
