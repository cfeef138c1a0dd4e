"""Process lookup (agent/processes.py, psutil) on real processes: by name (a comm cut at 15 bytes
and the full name), by PID file, oldest/newest/only, and a zombie or a vanished PID. Tier:
ptrace (it runs the watch fixture)."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest
from kdumpling.agent import processes
from kdumpling.errors import TargetGoneError, UsageError

from tests import watchtools as wt


def test_names_pid_files_and_selection(tmp_path: Path) -> None:
    exe = wt.compile_watch_target(tmp_path)
    long_name = f"kdl-long-name-{uuid.uuid4().hex[:8]}"  # 22 bytes: comm keeps 15
    named = tmp_path / long_name
    shutil.copy(exe, named)
    first = wt.start_watch_target(named)
    second = wt.start_watch_target(named)
    try:
        assert processes.find_processes(long_name) == [first.pid, second.pid]  # oldest first
        assert processes.find_processes(long_name[:15]) == [first.pid, second.pid]
        assert processes.find_processes(long_name[:14]) == []
        assert processes.pid_by_name(long_name, "newest") == second.pid
        assert processes.pid_by_name(long_name, "oldest") == first.pid
        with pytest.raises(UsageError, match="2 processes are named"):
            processes.pid_by_name(long_name, "only")
        assert processes.comm(first.pid) == long_name
        assert processes.exe(first.pid) == str(named)
        pid_file = tmp_path / "x.pid"
        pid_file.write_text(f"{second.pid}\n")
        assert processes.pid_from_file(str(pid_file)) == second.pid
        second.stop()
        with pytest.raises(TargetGoneError, match="not running"):
            processes.pid_from_file(str(pid_file))
        with pytest.raises(TargetGoneError, match=f"no process with PID {second.pid}"):
            processes.running_pid(second.pid)
        assert processes.pid_by_name(long_name, "only") == first.pid
    finally:
        first.stop()
        second.stop()
    with pytest.raises(TargetGoneError, match="no process named"):
        processes.pid_by_name(long_name, "oldest")
