"""MMCAFNetLib.slicer_setup: installing the module's dependencies, and the clinical form before they are.

Packages are made "not installed" the way Python sees it (``sys.modules[name] = None``: find_spec
gives None, import fails), and the installers given to ``ensure_dependencies`` make them findable
again. The installers and the dialog are stand-ins because the real ones (the PyTorch extension,
Slicer's pip, a Qt dialog) cannot run here; everything else is the real code.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from MMCAFNetLib import checkpoint as ck
from MMCAFNetLib import model_catalog as mc
from MMCAFNetLib import slicer_setup as ss

ROOT = Path(__file__).resolve().parents[1]


class Installer:
    """Records calls; "installs" by making the blocked package importable again, or fails as told."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str, result: object = "module", error=None, fix=True):
        self.monkeypatch, self.name, self.result, self.error, self.fix = monkeypatch, name, result, error, fix
        self.calls: list[object] = []

    def __call__(self, argument: object) -> object:
        self.calls.append(argument)
        if self.error is not None:
            raise self.error
        if self.fix:  # as if it had just been installed: the (already loaded) real package is found again
            self.monkeypatch.setitem(sys.modules, self.name, REAL[self.name])
        return self.result


def never(*args: object) -> object:
    raise AssertionError("must not be called")


REAL = {name: importlib.import_module(name) for name in ("torch", "pandas", "highdicom")}


def block(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make packages look not installed: import fails and find_spec gives None (restored after the test)."""
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


# ----------------------------------------------------------------------------------------------
# Dependencies
# ----------------------------------------------------------------------------------------------


def test_requirements_leave_what_slicer_ships_alone():
    assert "pydicom" not in ss.PIP_REQUIREMENTS and "torch" not in ss.PIP_REQUIREMENTS
    assert ss.REQUIRED_PACKAGES == ("torch", "pandas", "highdicom")
    assert {"numpy", "SimpleITK", "pydicom"} <= set(ss.SLICER_PINNED)
    assert ss.TORCH_REQUIREMENT == ">=2.1"


@pytest.mark.parametrize(
    "version, usable",
    [("2.1.0", True), ("2.1.0+cu118", True), ("2.13.0", True), ("10.0", True),
     ("2.0.1", False), ("2.0.1+cpu", False), ("1.13.1", False), ("2.1.0a0", False), ("nonsense", False)],
)
def test_torch_version_is_compared_as_pep440(version, usable):
    assert ss.version_at_least(version, ss.MIN_TORCH_VERSION) is usable
    problem = ss.torch_problem(version)
    assert (problem == "") is usable
    if not usable:
        assert version in problem and ">=2.1" in problem and "PyTorch Util" in problem


@pytest.mark.parametrize(
    "version, usable",
    [("2.1", True), ("2.1.0+cu118", True), ("2.13.0", True), ("10.0", True),
     ("2.0.1", False), ("1.13.1", False), ("2.1.0a0", False), ("2.1.0rc1", False), ("nonsense", False)],
)
def test_without_packaging_the_release_numbers_are_compared(monkeypatch, version, usable):
    block(monkeypatch, "packaging", "packaging.version")
    assert ss.version_at_least(version, ss.MIN_TORCH_VERSION) is usable


def test_the_installed_torch_is_found_and_usable():
    import torch

    assert ss.torch_version() == ss.installed_version("torch")
    assert ss.torch_version().split("+")[0] == torch.__version__.split("+")[0]
    assert ss.torch_problem() == ""


def test_nothing_missing_asks_nothing_and_may_classify():
    outcome = ss.ensure_dependencies(confirm=never, install_torch=never, pip_install=never)
    assert outcome.ready and outcome.may_classify and not outcome.installed and outcome.message == ""


def test_a_declined_install_stops_quietly(monkeypatch):
    block(monkeypatch, "pandas")
    asked: list[str] = []
    outcome = ss.ensure_dependencies(confirm=lambda text: asked.append(text) or False, install_torch=never, pip_install=never)
    assert not outcome.ready and outcome.error == "" and not outcome.restart
    assert "pandas" in asked[0] and "torch" not in asked[0]


def test_pip_gets_the_requirement_and_a_constraints_file_pinning_slicers_own_packages(monkeypatch):
    block(monkeypatch, "pandas")
    seen: dict[str, str] = {}

    def pip_install(arguments):
        assert arguments[:2] == ["pandas>=1.5", "--constraint"]
        seen["path"], seen["text"] = arguments[2], Path(arguments[2]).read_text()
        return Installer(monkeypatch, "pandas")(arguments)

    outcome = ss.ensure_dependencies(confirm=lambda text: True, install_torch=never, pip_install=pip_install)
    pins = dict(line.split("==") for line in seen["text"].split())
    assert pins["numpy"] == ss.installed_version("numpy") and pins["SimpleITK"] == ss.installed_version("SimpleITK")
    assert not Path(seen["path"]).exists()  # removed after the install
    # installed: ready, but Apply stops so the user sees the (now readable) form before classifying
    assert outcome.ready and outcome.installed == ["pandas"] and not outcome.may_classify
    assert "press Apply again" in outcome.message and outcome.error == ""


def test_highdicom_for_the_dicom_outputs_comes_with_pip_under_the_same_pins(monkeypatch):
    block(monkeypatch, "highdicom")
    seen: list[list[str]] = []

    def pip_install(arguments):
        seen.append(list(arguments))
        pins = dict(line.split("==") for line in Path(arguments[2]).read_text().split())
        assert pins["pydicom"] == ss.installed_version("pydicom")  # highdicom must not replace Slicer's pydicom
        return Installer(monkeypatch, "highdicom")(arguments)

    outcome = ss.ensure_dependencies(confirm=lambda text: "highdicom" in text, install_torch=never, pip_install=pip_install)
    assert seen[0][:2] == ["highdicom>=0.22", "--constraint"]
    assert outcome.ready and outcome.installed == ["highdicom"]


def test_a_failed_pip_install_is_an_error_message_not_an_exception(monkeypatch):
    block(monkeypatch, "pandas")
    failing = Installer(monkeypatch, "pandas", error=subprocess.CalledProcessError(1, ["pip", "install"]))
    outcome = ss.ensure_dependencies(confirm=lambda text: True, install_torch=never, pip_install=failing)
    assert not outcome.ready and "pandas>=1.5" in outcome.error and "failed" in outcome.error
    assert outcome.message == outcome.error and len(failing.calls) == 1


def test_torch_comes_from_the_torch_installer_with_the_version_requirement(monkeypatch):
    block(monkeypatch, "torch", "pandas")
    torch_installer, pip = Installer(monkeypatch, "torch"), Installer(monkeypatch, "pandas")
    outcome = ss.ensure_dependencies(confirm=lambda text: True, install_torch=torch_installer, pip_install=pip)
    assert torch_installer.calls == [">=2.1"]
    assert all("torch" not in str(arguments) for arguments in pip.calls)
    assert outcome.ready and outcome.installed == ["torch", "pandas"] and not outcome.may_classify


@pytest.mark.parametrize(
    "installer, error, restart",
    [
        (dict(result=None, fix=False), "was not installed", False),
        (dict(error=RuntimeError("light-the-torch failed")), "light-the-torch failed", True),
        (dict(error=ss.DependencyError("Install 'PyTorch' from the Extensions Manager")), "Extensions Manager", False),
        (dict(fix=False), "still missing", True),  # installed, yet not importable in this session
    ],
)
def test_torch_install_failures_are_messages_with_a_restart_offer_where_it_helps(monkeypatch, installer, error, restart):
    block(monkeypatch, "torch")
    outcome = ss.ensure_dependencies(
        confirm=lambda text: True, install_torch=Installer(monkeypatch, "torch", **installer), pip_install=never
    )
    assert not outcome.ready and not outcome.may_classify
    assert error in outcome.error and outcome.restart is restart


def test_without_the_pytorch_extension_the_default_torch_installer_says_what_to_install(monkeypatch):
    block(monkeypatch, "PyTorchUtils")
    with pytest.raises(ss.DependencyError, match="Extensions Manager"):
        ss.install_torch_with_pytorchutils(ss.TORCH_REQUIREMENT)


# ----------------------------------------------------------------------------------------------
# The clinical form without torch and pandas
# ----------------------------------------------------------------------------------------------

FORM_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules.update(torch=None, pandas=None)  # not installed: import fails, find_spec gives None
    from MMCAFNetLib import slicer_setup
    panel = slicer_setup.Panel(sys.argv[1])
    out = {"missing": slicer_setup.missing_packages(), "forms": {}}
    for entry in panel.models.entries():
        fields, note = panel.form_fields(entry)
        out["forms"][entry.id] = {"note": note, "fields": [[f.name, f.kind, f.choices] for f in fields]}
    out["loaded"] = sorted(m for m in ("torch", "pandas") if sys.modules.get(m) is not None)
    print(json.dumps(out))
    """
)


def test_the_clinical_form_builds_without_torch_and_pandas(tmp_path):
    """Slicer shows the form before the first Apply installs them: catalog schema, no checkpoint read."""
    models = tmp_path / "models"
    source = ck.load_checkpoint(mc.model_path(next(e for e in mc.load_catalog() if e.demo)))
    for name in ("new", "old"):  # two user models: one with the schema in its sidecar, one from before that
        path = tmp_path / f"{name}.pt"
        ck.save_checkpoint({**source, "schema": {**source["schema"], "fields": source["schema"]["fields"][:3]}}, path)
        mc.add_model_from_file(path, models)
    sidecar = models / "old.pt.json"
    sidecar.write_text(json.dumps({k: v for k, v in json.loads(sidecar.read_text()).items() if k != "schema_spec"}))

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", FORM_SCRIPT, str(models)], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["missing"] == ["torch", "pandas"] and out["loaded"] == []

    demo = out["forms"]["mmcafnet-lite-demo"]
    fields = source["schema"]["fields"]
    assert demo["note"] == "" and [f[0] for f in demo["fields"]] == [f["name"] for f in fields]
    t_stage = next(f for f in demo["fields"] if f[0] == "t_stage")
    spec = next(f for f in fields if f["name"] == "t_stage")
    assert t_stage[2] == [["unknown", "unknown"], *map(list, zip(spec["values"], spec["value_labels"]))]
    assert out["forms"]["new"] == {"note": "", "fields": demo["fields"][:3]}  # from its sidecar
    # the old sidecar needs the checkpoint read, which needs torch: the default fields it names, and a note
    assert [f[0] for f in out["forms"]["old"]["fields"]] == ["sex", "age", "weight"]
    assert "once the dependencies are installed" in out["forms"]["old"]["note"]


def test_a_model_file_that_cannot_be_read_gives_the_default_form_and_says_why(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "broken.pt").write_bytes(b"not a checkpoint")
    panel = ss.Panel(str(models))
    broken = next(e for e in panel.models.entries() if e.id == "broken")
    fields, note = panel.form_fields(broken)
    assert [f.name for f in fields] == ["sex", "age", "weight", "t_stage", "n_stage", "m_stage", "smoking"]
    assert "could not be read" in note


def test_saved_records_that_are_not_json_objects_read_as_empty():
    assert ss.Panel.saved_record('{"sex": "F", "age": 60}') == {"sex": "F", "age": 60}
    for text in ("", "{", "[1, 2]", "null", '"text"'):
        assert ss.Panel.saved_record(text) == {}
