"""Setting up the Slicer module: its Python dependencies, the clinical form, a demo case.

Qt-free, so MMCAFNet.py stays a thin widget and this is tested outside Slicer. Importable with
the standard library alone, and the form path runs with numpy but without torch or pandas: the
panel must show the model's clinical form before anything is installed (installation happens at
the first Apply, after asking).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

#: Oldest torch the library supports (what the PyTorch extension is asked for, and what is checked).
MIN_TORCH_VERSION = "2.1"
TORCH_REQUIREMENT = f">={MIN_TORCH_VERSION}"
#: Packages installed with pip at the first Apply. Not torch (the PyTorch extension picks the build
#: that matches the GPU driver), and not what Slicer ships: numpy, SimpleITK, pydicom. highdicom writes
#: the DICOM SEG and Parametric Map of a result (the same outputs as the command line's).
PIP_REQUIREMENTS = {"pandas": "pandas>=1.5", "highdicom": "highdicom>=0.22"}
#: Slicer's own distributions, pinned to their installed versions so pip never replaces them.
SLICER_PINNED = ("numpy", "SimpleITK", "pydicom")
REQUIRED_PACKAGES = ("torch", *PIP_REQUIREMENTS)
TITLE = "MMCAF-Net"


class DependencyError(RuntimeError):
    """An installation problem that its message fully explains (a restart would not help)."""


# ----------------------------------------------------------------------------------------------
# Dependencies
# ----------------------------------------------------------------------------------------------


def missing_packages() -> list[str]:
    """Import names of required packages that cannot be found (nothing is imported)."""
    importlib.invalidate_caches()  # a package pip installed a moment ago must be seen
    return [name for name in REQUIRED_PACKAGES if importlib.util.find_spec(name) is None]


def installed_version(distribution: str) -> Optional[str]:
    """Version of an installed distribution from its metadata, or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_at_least(version: str, minimum: str) -> bool:
    """``version >= minimum`` by PEP 440 (what pip and the PyTorch extension use); unparsable is False.

    Without ``packaging`` (Slicer ships it; a bare Python may not), the numeric release parts are
    compared and a pre-release counts as older than its release.
    """
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:
        return _release(version) >= _release(minimum)
    try:
        return Version(version) >= Version(minimum)
    except InvalidVersion:
        return False


def _release(version: str) -> tuple[int, ...]:
    """(2, 1, 0, 0, 0) for "2.1" or "2.1.0+cu118"; a pre-release (2.1.0a0, 2.1.0rc1) ends in -1."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)(\S*)", version)
    if not match:
        return (-1,)
    parts = [int(p) for p in match.group(1).split(".")][:4]
    pre = re.match(r"[.-]?(a|b|rc|alpha|beta|pre|preview|dev)\d*", match.group(2), re.I)
    return (*parts, *[0] * (4 - len(parts)), -1 if pre else 0)


def torch_version() -> Optional[str]:
    """Installed torch version: its metadata, else (a build without metadata) ``torch.__version__``."""
    version = installed_version("torch")
    if version is None and importlib.util.find_spec("torch") is not None:
        import torch

        version = str(torch.__version__)
    return version


def torch_problem(version: Optional[str] = None) -> str:
    """Why the installed torch cannot be used ("" when it can, or when none is installed)."""
    version = torch_version() if version is None else version
    if version is None or version_at_least(version, MIN_TORCH_VERSION):
        return ""
    return (
        f"PyTorch {version} is installed, but MMCAF-Net needs PyTorch {TORCH_REQUIREMENT}. Install a newer "
        f"one in the 'PyTorch Util' module (version requirement '{TORCH_REQUIREMENT}'), restart Slicer and "
        "press Apply again."
    )


def write_constraints(folder: Optional[str] = None) -> str:
    """A pip constraints file pinning the distributions Slicer ships (SimpleITK, numpy, pydicom)."""
    lines = [f"{name}=={version}" for name in SLICER_PINNED if (version := installed_version(name))]
    handle, path = tempfile.mkstemp(prefix="mmcafnet-constraints-", suffix=".txt", dir=folder)
    with os.fdopen(handle, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


@dataclass
class SetupOutcome:
    """What ``ensure_dependencies`` did. Classify only when ``ready`` and nothing was just installed."""

    ready: bool
    installed: list[str] = field(default_factory=list)
    error: str = ""  # for an error dialog; "" when there is nothing to report
    restart: bool = False  # offer to restart Slicer (a half-loaded or just-replaced package)

    @property
    def may_classify(self) -> bool:
        """An install changes the form (the model's own schema can be read now): show it first."""
        return self.ready and not self.installed

    @property
    def message(self) -> str:
        """What to tell the user: the error, or that Apply must be pressed again after installing."""
        if self.error:
            return self.error
        if self.installed:
            return f"Installed {', '.join(self.installed)}. Check the clinical form, then press Apply again."
        return ""


def install_torch_with_pytorchutils(requirement: str) -> Any:
    """torch from the PyTorch extension, whose light-the-torch picks the build for this GPU driver.

    Never plain pip: a pip wheel may not match the driver (the most common complaint about ML
    extensions). Returns the torch module, or None when it was not installed.
    """
    try:
        import PyTorchUtils
    except ImportError:
        raise DependencyError(
            "The PyTorch extension is required. Install 'PyTorch' from the Extensions Manager, restart "
            "Slicer, then press Apply again."
        ) from None
    torch_logic = PyTorchUtils.PyTorchUtilsLogic()
    if torch_logic.torchInstalled():
        return torch_logic.torch
    return torch_logic.installTorch(askConfirmation=False, torchVersionRequirement=requirement)


def _slicer_confirm(text: str) -> bool:
    import slicer

    return bool(slicer.util.confirmOkCancelDisplay(text, windowTitle=TITLE))


def _slicer_pip_install(arguments: list[str]) -> Any:
    import slicer

    return slicer.util.pip_install(arguments)


def ensure_dependencies(
    confirm: Callable[[str], bool] = _slicer_confirm,
    install_torch: Callable[[str], Any] = install_torch_with_pytorchutils,
    pip_install: Callable[[list[str]], Any] = _slicer_pip_install,
) -> SetupOutcome:
    """Install what is missing after ``confirm``: torch with ``install_torch``, the rest with pip.

    Defaults are Slicer's dialog, the PyTorch extension and Slicer's pip. Failures come back as
    ``SetupOutcome.error`` (never as an exception), so the panel shows them in a dialog.
    ``install_torch(requirement)`` returns the torch module or None (declined, failed);
    ``pip_install(arguments)`` raises when pip fails (``slicer.util.pip_install`` does).
    """
    missing = missing_packages()
    problem = torch_problem() if "torch" not in missing else ""
    if problem:
        return SetupOutcome(False, error=problem)
    if not missing:
        return SetupOutcome(True)
    if not confirm(
        "MMCAF-Net needs these Python packages, which will be downloaded and installed now: "
        + ", ".join(missing) + ". This can take several minutes."
    ):
        return SetupOutcome(False)
    installed: list[str] = []
    if "torch" in missing:
        try:
            torch = install_torch(TORCH_REQUIREMENT)
        except DependencyError as exc:
            return SetupOutcome(False, error=str(exc))
        except Exception as exc:
            return SetupOutcome(False, error=f"PyTorch could not be installed: {exc}", restart=True)
        if torch is None:
            return SetupOutcome(False, error="PyTorch was not installed; see the PyTorch Util module for details.")
        installed.append("torch")
    pip_missing = [PIP_REQUIREMENTS[name] for name in missing if name in PIP_REQUIREMENTS]
    if pip_missing:
        constraints = ""
        try:
            constraints = write_constraints()
            pip_install([*pip_missing, "--constraint", constraints])
        except Exception as exc:
            return SetupOutcome(False, installed, error=f"Installing {', '.join(pip_missing)} failed: {exc}")
        finally:
            with contextlib.suppress(OSError):
                if constraints:
                    os.remove(constraints)
        installed += [name for name in missing if name in PIP_REQUIREMENTS]
    still = missing_packages()
    if still:
        return SetupOutcome(
            False, installed, error=f"These packages are still missing after installing: {', '.join(still)}. "
            "Restart Slicer and press Apply again.", restart=True,
        )
    problem = torch_problem()
    if problem:
        return SetupOutcome(False, installed, error=problem, restart=True)
    return SetupOutcome(True, installed)


# ----------------------------------------------------------------------------------------------
# The clinical form
# ----------------------------------------------------------------------------------------------


def form_fields(entry: Any, models_dir: Any = None) -> tuple[list[Any], str]:
    """The form's fields for a catalog/user model entry, and a note when they are a stand-in.

    Catalog models carry their whole schema in Models.json and user models in their sidecar, so
    this needs neither torch nor pandas. Only a user model added before sidecars held the schema
    needs its checkpoint read, which needs torch: until it is installed, the default fields the
    model names are shown (with a note), never an error.
    """
    from MMCAFNetLib import ehr, slicer_logic

    note = ""
    try:
        schema = slicer_logic.form_schema(entry, models_dir)
    except ImportError:
        default = ehr.default_schema()
        named = [n for n in (entry.schema if entry is not None else []) if n in default.field_names]
        schema = default.select(named) if named else default
        note = "This model's own form appears once the dependencies are installed (press Apply)."
    except (OSError, ValueError) as exc:  # an unreadable model file: Apply reports it as well
        schema = ehr.default_schema()
        note = f"The model's clinical schema could not be read ({exc}); the default form is shown."
    return slicer_logic.form_fields(schema), note


# ----------------------------------------------------------------------------------------------
# The rest of the panel's Qt-free work
# ----------------------------------------------------------------------------------------------


def models_folder() -> str:
    """Where user models go: ``$MMCAFNET_MODELS_DIR``, else beside Slicer's user settings (the panel
    opens and clears it), else ``~/MMCAFNet/models`` outside the application."""
    from MMCAFNetLib.model_catalog import MODELS_DIR_ENV

    if os.environ.get(MODELS_DIR_ENV):
        return os.environ[MODELS_DIR_ENV]
    try:
        import slicer

        base = os.path.dirname(slicer.app.slicerUserSettingsFilePath)
    except (ImportError, AttributeError):  # no Slicer application (scripts, tests)
        base = os.path.expanduser("~")
    return os.path.join(base, "MMCAFNet", "models")


class Panel:
    """The Qt-free work behind the module's panel, reached through ``MMCAFNetLogic().panel``.

    It lives here, not in MMCAFNet.py, so the widget stays Qt code only and all of this is tested
    outside Slicer.
    """

    def __init__(self, models_dir: Optional[str] = None) -> None:
        from MMCAFNetLib.model_catalog import ModelFolder

        self.models = ModelFolder(models_dir if models_dir is not None else models_folder())

    def form_fields(self, entry: Any) -> tuple[list[Any], str]:
        """(fields, note) of a model's clinical form; see ``form_fields``."""
        return form_fields(entry, self.models.folder)

    def options(self, parameter_node: Any = None, entry: Any = None, **values: Any) -> Any:
        """ClassificationOptions from the panel's parameter node and model entry; keywords override."""
        from MMCAFNetLib.slicer_logic import ClassificationOptions

        if parameter_node is not None:
            p = parameter_node
            values = {"device": p.device, "heatmap": p.heatmapMethod, "threshold": float(p.heatmapThreshold),
                      "show": bool(p.showOutputs), **values}
        if entry is not None:
            values["model_path"] = str(self.models.path(entry))
        return ClassificationOptions(**values)

    @staticmethod
    def saved_record(text: str) -> dict[str, Any]:
        """The clinical record a parameter node stores as JSON; {} for anything unreadable."""
        try:
            record = json.loads(text or "{}")
        except ValueError:
            return {}
        return record if isinstance(record, dict) else {}

    @staticmethod
    def record_from_dicom(volume_node: Any) -> dict[str, Any]:
        """Sex, age and weight from Slicer's DICOM database, for a CT loaded from it ({} otherwise)."""
        import slicer

        from MMCAFNetLib.scene import record_from_dicom_database

        return record_from_dicom_database(volume_node, getattr(slicer, "dicomDatabase", None))

    @staticmethod
    def load_results(folder: str, selected_ct: Any = None) -> str:
        """The "Load results" button: a result folder onto the selected CT when its maps lie on that
        CT's grid, else onto the CT the folder names (loaded); returns the panel's result line."""
        from MMCAFNetLib import scene, slicer_logic
        from MMCAFNetLib.inference.result_folder import is_batch_folder, read_result_folder

        ct = None
        if selected_ct is not None and not is_batch_folder(folder):
            ct = selected_ct if scene.result_fits(selected_ct, read_result_folder(folder).result) else None
        return slicer_logic.loaded_summary(slicer_logic.load_results(folder, ct))

    @staticmethod
    def header_fill_message(record: dict[str, Any]) -> str:
        """The status line after filling the form from the DICOM header: what was filled, as the
        command line announces it (values the schema refuses were already left out)."""
        if not record:
            return "No usable DICOM header values found for this volume"
        from MMCAFNetLib.ehr import describe_values

        return f"Filled from the DICOM header: {describe_values(record)}"

    @staticmethod
    def job_summary(job: Any) -> str:
        """The panel's result line for a finished job: cancelled, failed, or the class and its time."""
        from MMCAFNetLib.slicer_logic import result_summary

        if job.cancelled:
            return "Cancelled; the scene is unchanged."
        if job.error is not None:
            return "Failed; the scene is unchanged."
        return f"{result_summary(job.result)}  ({job.elapsed:.1f} s)"


# ----------------------------------------------------------------------------------------------
# A demo case in the scene (self-test, first look)
# ----------------------------------------------------------------------------------------------


def add_demo_case(letter: str = "A", seed: int = 7, size: int = 64) -> tuple[Any, Any, dict[str, Any]]:
    """A synthetic CT and a point on its lesion in ``slicer.mrmlScene``; returns (CT, point, record)."""
    import numpy as np
    import slicer

    from MMCAFNetLib.synthetic import make_case

    case = make_case(letter, seed=seed, size=size)
    ct = slicer.util.addVolumeFromArray(np.ascontiguousarray(case.volume.array), case.volume.ijk_to_ras, "Synthetic CT")
    point = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Lesion")
    point.AddControlPoint(*[float(x) for x in case.lesion_center_ras])
    return ct, point, dict(case.record)


def same_grid(node: Any, reference: Any) -> bool:
    """Whether two volume nodes share size and IJK->RAS (outputs must lie on the CT's grid)."""
    import numpy as np

    from MMCAFNetLib.scene import node_ijk_to_ras

    same_size = node.GetImageData().GetDimensions() == reference.GetImageData().GetDimensions()
    return same_size and bool(np.allclose(node_ijk_to_ras(node), node_ijk_to_ras(reference), atol=1e-6))
