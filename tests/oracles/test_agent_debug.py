"""``kdumpling-agent debug`` on a kernel dump opens it in drgn (from test_agent_capture.py)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from kdumpling import KdumpBuilder

from tests import tiers
from tests.test_agent_capture import VMCI


@pytest.mark.readers
def test_debug_opens_a_kernel_dump_in_drgn(tmp_path: Path) -> None:
    """``debug`` on a kernel dump runs drgn on it (crash only with --vmlinux)."""
    from tests.agenttools import clean_env, run_agent

    if shutil.which("drgn", path=os.path.dirname(sys.executable)) is None:
        tiers.missing("readers", "drgn's command is not installed next to this Python")
    dump = tmp_path / "k.kdump"
    b = KdumpBuilder().set_vmcoreinfo(VMCI).add_memory_segment(0x100000, b"kdumpling" * 100)
    b.write(str(dump), format="kdump", compression="zlib")
    env_path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    code = "print(prog.read(0x100000, 9, True))"
    proc = run_agent(["debug", str(dump), "-A", f"--quiet -e '{code}'"], tmp_path,
                     env=clean_env(tmp_path, PATH=env_path))
    assert proc.returncode == 0, proc.stderr
    assert "b'kdumpling'" in proc.stdout
    no_vmlinux = run_agent(["debug", str(dump), "--debugger", "crash"], tmp_path)
    assert no_vmlinux.returncode == 2
    assert no_vmlinux.stderr.strip().count("\n") == 0 and "--vmlinux" in no_vmlinux.stderr
