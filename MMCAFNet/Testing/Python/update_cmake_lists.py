"""Regenerate the file lists in MMCAFNet/CMakeLists.txt (run after adding or removing a file).

    python MMCAFNet/Testing/Python/update_cmake_lists.py          # rewrite the lists
    python MMCAFNet/Testing/Python/update_cmake_lists.py --check  # exit 1 if they are stale

A file missing from these lists is silently missing from the installed extension, so the test
suite compares them with the repository (Testing/test_slicer_static.py). Listed: every .py of
MMCAFNetLib (installed next to the module so ``import MMCAFNetLib`` works in Slicer), every other
file of MMCAFNetLib, and every file under Resources/ except Screenshots/ (those are only for the
Extensions catalog page). Files come from ``git ls-files`` when the tree is a git checkout, so
untracked scratch files never enter the build.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
CMAKE = ROOT / "MMCAFNet" / "CMakeLists.txt"
BEGIN = "# BEGIN GENERATED FILE LISTS (MMCAFNet/Testing/Python/update_cmake_lists.py)"
END = "# END GENERATED FILE LISTS"
EXCLUDED_RESOURCE_DIRS = ("Resources/Screenshots/",)
IGNORED = re.compile(r"(__pycache__/|\.pyc$|\.DS_Store$|\.(tmp|part)$)")


def repository_files(root: Path = ROOT) -> list[str]:
    """Tracked files (git), or every file when the tree is not a git checkout."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=root, check=True, capture_output=True, timeout=60
        ).stdout.decode("utf-8")
        files = [f for f in out.split("\0") if f and (root / f).is_file()]
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    return sorted(f for f in files if not IGNORED.search(f))


def expected_lists(root: Path = ROOT) -> dict[str, list[str]]:
    files = repository_files(root)
    lib = [f for f in files if f.startswith("MMCAFNetLib/")]
    return {
        "MMCAFNetLib_PYTHON_SCRIPTS": [f for f in lib if f.endswith(".py")],
        "MMCAFNetLib_PYTHON_RESOURCES": [f for f in lib if not f.endswith(".py")],
        "MMCAFNet_RESOURCE_FILES": [
            f for f in files if f.startswith("Resources/") and not f.startswith(EXCLUDED_RESOURCE_DIRS)
        ],
    }


def render(lists: dict[str, list[str]]) -> str:
    parts = [BEGIN]
    for name, files in lists.items():
        parts.append(f"set({name}")
        parts += [f"  {f}" for f in files]
        parts.append("  )")
    parts.append(END)
    return "\n".join(parts)


def parse_lists(text: str) -> dict[str, list[str]]:
    """The set(NAME files...) blocks of a CMake file."""
    lists = {}
    for match in re.finditer(r"set\((\w+)\s*([^)]*)\)", text):
        lists[match.group(1)] = match.group(2).split()
    return lists


def update(check: bool = False) -> bool:
    """Rewrite the generated block; returns True when it was already up to date."""
    text = CMAKE.read_text(encoding="utf-8")
    start, end = text.index(BEGIN), text.index(END) + len(END)
    block = render(expected_lists())
    if text[start:end] == block:
        return True
    if not check:
        CMAKE.write_text(text[:start] + block + text[end:], encoding="utf-8")
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether the lists are stale")
    args = parser.parse_args(argv)
    fresh = update(check=args.check)
    if args.check and not fresh:
        print(f"{CMAKE} lists are stale; run {Path(__file__).name}", file=sys.stderr)
        return 1
    print("up to date" if fresh else f"updated {CMAKE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
