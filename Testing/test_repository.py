"""Repository-level checks: CI runs the README's command, lint is clean, the library imports alone."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_code_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", quick, flags=re.S)]


def test_quick_start_has_two_commands_and_ci_runs_the_test_one():
    blocks = _readme_code_blocks()
    assert len(blocks) == 2, "the Quick start must hold exactly two commands"
    assert all("\n" not in b for b in blocks)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert blocks[1] in ci, ".ci/run must call the README's test command verbatim"
    assert "pytest" in blocks[1] and "mmcafnet demo" in blocks[0]


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (it comes with the [test] extra)")
    result = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_library_imports_without_slicer_or_qt():
    code = (
        "import sys\n"
        "for name in ('slicer', 'qt', 'ctk', 'vtk'):\n"
        "    sys.modules[name] = None  # any import of these now fails\n"
        "import importlib, pkgutil, MMCAFNetLib\n"
        "for m in pkgutil.walk_packages(MMCAFNetLib.__path__, 'MMCAFNetLib.'):\n"
        "    importlib.import_module(m.name)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_cli_lists_every_command_and_each_has_help():
    from MMCAFNetLib.cli import COMMANDS

    out = subprocess.run(
        [sys.executable, "-m", "MMCAFNetLib.cli", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout
        sub = subprocess.run(
            [sys.executable, "-m", "MMCAFNetLib.cli", name, "--help"], capture_output=True, text=True, cwd=ROOT
        )
        assert sub.returncode == 0, f"`mmcafnet {name} --help` failed: {sub.stderr}"


def test_project_names_no_machine_paths():
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT).stdout.split()
    offenders = []
    pattern = re.compile(r"/work/|/tmp/bash_jobs|\.library|/root/")
    for rel in tracked:
        path = ROOT / rel
        if path.suffix in {".png", ".pt", ".xlsx", ".dcm", ".nrrd", ".gz"} or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="ignore")
        if pattern.search(text) and rel != "Testing/test_repository.py":
            offenders.append(rel)
    assert not offenders, f"files naming paths of a particular machine: {offenders}"
