"""Load MMCAFNet/MMCAFNet.py on Slicer's own Python layer, as Slicer would, without the application.

Slicer 5.10's ``parameterNodeWrapper``, ``ScriptedLoadableModule`` and ``i18n`` are unmodified copies
in the shared folder (``$MMCAFNET_SHARED``, or ``shared/`` beside the repository:
``third_party/slicer-5.10.0``); slicer-core provides the real MRML scene and ``slicer.util``. What
no wheel provides is Qt: ``qt``, ``ctk`` and the few Qt widget classes that Slicer puts in the
``slicer`` namespace (``slicer.qMRMLNodeComboBox``...) are stood in for while the files are
imported (class annotations and a ``qt.QColor`` subclass are evaluated then) and removed right
after, so anything that really needs Qt at run time fails loudly instead of running on a fake.
Every module the loader added is taken out of ``sys.modules`` again when ``slicer_layer()`` ends.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import sys
import types
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_FILE = ROOT / "MMCAFNet" / "MMCAFNet.py"
SLICER_VERSION_FOLDER = "slicer-5.10.0"
#: The Slicer Python-layer files, imported by their own names and registered as ``slicer.<name>``.
LAYER_MODULES = ("i18n", "parameterNodeWrapper", "ScriptedLoadableModule")
#: Qt widget classes (qMRMLWidgets, qSlicerBaseQTGUI) that the layer names at import time.
QT_CLASSES_IN_SLICER = (
    "qMRMLNodeComboBox", "qMRMLRangeWidget", "qMRMLSliderWidget", "qMRMLSpinBox", "qMRMLWidget",
    "qSlicerWidget", "qMRMLScreenShotDialog", "qMRMLUtils",
)


def shared_dir() -> Path:
    env = os.environ.get("MMCAFNET_SHARED")
    return Path(env) if env else ROOT.parent / "shared"


def slicer_layer_dir() -> Path:
    """The folder holding Slicer's Python-layer copies (``parameterNodeWrapper/`` and the rest)."""
    return shared_dir() / "third_party" / SLICER_VERSION_FOLDER / "slicer"


def _stand_in_module(name: str) -> types.ModuleType:
    """A module whose every public attribute is an empty class of that name (``qt.QColor`` ...)."""
    module = types.ModuleType(name, f"import-time stand-in for {name}; not usable at run time")
    classes: dict[str, type] = {}

    def __getattr__(attr: str) -> type:
        if attr.startswith("__"):
            raise AttributeError(attr)
        if attr not in classes:
            classes[attr] = type(attr, (), {"__module__": name})
        return classes[attr]

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    return module


@contextlib.contextmanager
def qt_stand_ins(slicer: types.ModuleType) -> Iterator[None]:
    """``qt``/``ctk`` and Slicer's Qt widget classes exist only inside this block."""
    saved = {name: sys.modules.get(name) for name in ("qt", "ctk")}
    added = [name for name in QT_CLASSES_IN_SLICER if not hasattr(slicer, name)]
    sys.modules["qt"], sys.modules["ctk"] = _stand_in_module("qt"), _stand_in_module("ctk")
    for name in added:
        setattr(slicer, name, type(name, (), {"__module__": "slicer"}))
    try:
        yield
    finally:
        for name in added:
            delattr(slicer, name)
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def import_module_file(slicer: types.ModuleType) -> types.ModuleType:
    """Import the Slicer layer and then MMCAFNet.py by file path as module "MMCAFNet" (Slicer's way)."""
    layer = slicer_layer_dir()
    sys.path.insert(0, str(layer))
    try:
        with qt_stand_ins(slicer):
            for name in LAYER_MODULES:
                module = importlib.import_module(name)
                sys.modules[f"slicer.{name}"] = module
                setattr(slicer, name, module)
            spec = importlib.util.spec_from_file_location("MMCAFNet", MODULE_FILE)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules["MMCAFNet"] = module
            spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(layer))
    return module


@contextlib.contextmanager
def slicer_layer() -> Iterator[types.ModuleType]:
    """MMCAFNet.py imported on Slicer 5.10's Python layer; ``sys.modules`` and ``slicer`` restored after."""
    import slicer

    attributes_before = set(vars(slicer))
    try:
        yield import_module_file(slicer)
    finally:
        for name in [n for n in sys.modules if _loaded_here(n)]:
            del sys.modules[name]
        for name in set(vars(slicer)) - attributes_before:
            delattr(slicer, name)


def _loaded_here(name: str) -> bool:
    """A module this loader put in sys.modules (the Slicer layer, its registrations, the module file)."""
    top = name.split(".")[0]
    return name == "MMCAFNet" or top in LAYER_MODULES or name in {f"slicer.{n}" for n in LAYER_MODULES}


def require_slicer_layer() -> None:
    """Skip (with the reason) where the shared Slicer layer or slicer-core is absent."""
    if not (slicer_layer_dir() / "parameterNodeWrapper" / "__init__.py").is_file():
        pytest.skip(f"Slicer's Python layer is not available (looked in {slicer_layer_dir()}; set MMCAFNET_SHARED)")
    pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML libraries) is not installed")


def cmake_category() -> str:
    """EXTENSION_CATEGORY of the top-level CMakeLists.txt (the Extensions Index category)."""
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    return re.search(r'^set\(EXTENSION_CATEGORY "([^"]*)"\)', text, re.M).group(1)
