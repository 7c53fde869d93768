"""Zip archives for the model-catalog and security tests."""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path
from typing import Optional, Union


def make_zip(path: Path, members: dict[str, Union[bytes, Path]], symlink: Optional[str] = None) -> Path:
    """An archive holding ``members`` (name -> bytes, or a file to copy in), plus, with ``symlink``,
    a member of that name marked as a symbolic link."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            if isinstance(data, Path):
                zf.write(data, name)
            else:
                zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return path
