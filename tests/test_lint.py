"""ruff and mypy --strict stay clean (the brief's bar), checked where CI runs the tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests import tiers

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {"kdumpling": "writer", "kdumpling/collectors": "collectors",
                "kdumpling/agent": "agent"}


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        tiers.missing("lint", f"{name} is not installed (pip install -e '.[test]')")
    return found


def test_ruff_is_clean() -> None:
    res = subprocess.run([_bin("ruff"), "check", "--output-format", "concise", "."],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy_strict_is_clean(tmp_path: Path) -> None:
    # The folders install under other names (pyproject package-dir), which mypy cannot follow
    # through an editable install: give it the installed layout as a tree of symlinks.
    for pkg, folder in PACKAGE_DIRS.items():
        dest = tmp_path / pkg
        dest.mkdir(parents=True, exist_ok=True)
        for src in (ROOT / folder).iterdir():
            if src.suffix in (".py", ".typed") or (src / "__init__.py").is_file():
                os.symlink(src, dest / src.name)  # a module, or a subpackage as a whole
    res = subprocess.run(
        [_bin("mypy"), "--config-file", str(ROOT / "pyproject.toml"), "--cache-dir",
         str(tmp_path / ".mypy_cache"), "-p", "kdumpling"],
        cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "MYPYPATH": ""},
    )
    assert res.returncode == 0, res.stdout + res.stderr
