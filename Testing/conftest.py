"""Shared pytest fixtures."""

import pytest


@pytest.fixture
def mrml_scene():
    """Slicer's real MRML scene (slicer-core wheel) with the colour, volumes and segmentations logics.

    slicer.util looks up ``slicer.mrmlScene`` and ``slicer.modules``, so they are set for the test
    and removed afterwards.
    """
    pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML libraries) is not installed")
    from mrml_support import close_scene, open_scene

    scene = open_scene()
    yield scene
    close_scene(scene)


@pytest.fixture
def one_torch_thread():
    """Many small torch ops run far faster on one thread than on two when the cores are shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
