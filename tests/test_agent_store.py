"""The snapshot store and its records, without live processes: what the store may delete,
abandoned captures, target locks, and records of any age loading and writing the same JSON."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from kdumpling.agent.record import CaptureResult, SnapshotRecord
from kdumpling.agent.store import SnapshotStore
from kdumpling.agent.store_dir import DirectoryStore

from tests.agenttools import assert_one_error_line, run_agent

# A record as the agent before the record dataclass wrote it (a process core, into a store),
# plus a key this version does not know.
OLD_RECORD = {
    "annotations": {"ticket": "KDL-5"}, "arch": "x86_64", "bytes_in": 40013824,
    "bytes_out": 40267776, "codec": "none", "compression_level": None, "dev": 2049,
    "dump_level": 1, "exe": "/usr/sbin/nginx", "file": "web-20261126T033900Z.core",
    "format": "elf", "host": "prod-01", "id": "web-20261126T033900Z", "inode": 1234,
    "kind": "process", "meta": {"mode": "consistent", "threads": 4}, "mtime_ns": 17956643400,
    "pages": None, "pause_seconds": 0.041, "pid": 812, "schema": "kdumpling-snapshot/1",
    "sha256": "ab" * 32, "size": 40267776, "state": "complete", "target": "web (process nginx)",
    "target_key": "web", "time": "2026-11-26T03:39:00Z", "time_unix": 1795664340.0,
    "total_seconds": 0.33, "truncated": False, "type": "process",
    "unreadable": [{"start": 4096, "end": 8192, "reason": "[vvar]: special VM_IO mapping",
                    "expected": True}],
    "warnings": [], "write_seconds": 0.21, "zero_pages": None, "from_the_future": [1, 2],
}
RESERVED = {"agent_pid": 4242, "file": "vm-20261126T033900Z.kdump", "host": "h",
            "id": "vm-20261126T033900Z", "schema": "kdumpling-snapshot/1", "state": "capturing",
            "target": "domain vm", "target_key": "vm", "time": "2026-11-26T03:39:00Z",
            "time_unix": 1795664340.0, "type": "libvirt"}


@pytest.mark.parametrize("data", [OLD_RECORD, RESERVED], ids=["complete", "capturing"])
def test_records_load_and_write_the_same_json(data: dict[str, object]) -> None:
    rec = SnapshotRecord.from_json(json.loads(json.dumps(data)))
    assert rec.to_json() == data
    assert rec.state == data["state"] and rec.target_key == data["target_key"]


def test_record_reads_typed_fields() -> None:
    rec = SnapshotRecord.from_json(dict(OLD_RECORD, bytes_out="lots"))
    assert rec.bytes_out is None  # a value of the wrong type reads as missing
    assert rec.unreadable is not None and rec.unreadable[0].expected
    assert not rec.has_warnings and rec.unexpected_unreadable == []
    assert rec.extra == {"from_the_future": [1, 2]}


def test_capture_result_json_for_a_file() -> None:
    """``--json`` of a capture into a file: no store keys, id null, the path and exit code."""
    rec = SnapshotRecord(target="dump x", target_key="x", type="convert", kind="kernel",
                         format="kdump", codec="zlib", compression_level=9, time="t",
                         time_unix=1.0)
    out = CaptureResult(rec, "/tmp/x.kdump", 0).to_json()
    assert out["id"] is None and out["path"] == "/tmp/x.kdump" and out["pruned"] == []
    assert out["pages"] is None and out["compression_level"] == 9 and out["exit_code"] == 0
    assert "schema" not in out and "state" not in out and "dev" not in out


def test_directory_store_is_a_snapshot_store(tmp_path: Path) -> None:
    store: SnapshotStore = DirectoryStore(str(tmp_path / "s"))
    with store:
        res = store.reserve("web", "core", SnapshotRecord(target="web", type="process"))
        on_disk = json.loads((tmp_path / "s" / res.sidecar).read_text())
        assert on_disk["state"] == "capturing" and on_disk["agent_pid"] == os.getpid()
        Path(res.path).write_bytes(b"x" * 8192)
        done = store.commit(res, SnapshotRecord(target="web", target_key="web", type="process",
                                                format="elf", bytes_out=8192))
        assert done.agent_pid is None and done.size == 8192 and done.state == "complete"
        (rec,) = store.records()
        assert rec.snapshot == done and store.find("web") == rec
        assert store.spool_dir == str(tmp_path / "s")
        assert store.usage() >= 8192


def test_records_appear_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader listing the store while a record is written never finds it empty or half
    there (the service's list/prune run while captures reserve names)."""
    store = DirectoryStore(str(tmp_path / "s"))
    seen: list[dict[str, object]] = []
    real_write = os.write

    def write(fd: int, data: bytes | memoryview) -> int:
        # Every record a reader would list at this moment must parse whole.
        seen.append({p.name: json.loads(p.read_text())
                     for p in (tmp_path / "s").glob("*.json")})
        return real_write(fd, data)

    with store:
        monkeypatch.setattr(os, "write", write)
        res = store.reserve("web", "core", SnapshotRecord(target="web", type="process"))
        Path(res.path).write_bytes(b"x" * 4096)
        store.commit(res, SnapshotRecord(target="web", target_key="web", type="process"))
        monkeypatch.undo()
    # Written while the reservation was: nothing listed; while the commit was: the reservation.
    assert seen[0] == {}
    assert seen[-1] == {res.sidecar: seen[-1][res.sidecar]}
    assert seen[-1][res.sidecar]["state"] == "capturing"


def test_store_only_removes_what_it_wrote(tmp_path: Path) -> None:
    store = DirectoryStore(str(tmp_path / "s"))
    res = store.reserve("web", "core", SnapshotRecord(target="web"))
    Path(res.path).write_bytes(b"x" * 4096)
    store.commit(res, SnapshotRecord(bytes_out=4096))
    (rec,) = store.records()
    assert store.status(rec) == "present"
    # replaced behind our back: same name, another file (maybe the same inode number, but a
    # later mtime): not ours to delete
    time.sleep(0.05)
    os.unlink(res.path)
    Path(res.path).write_bytes(b"y" * 4096)
    assert store.status(rec) == "modified"
    store.remove(rec)
    assert Path(res.path).read_bytes() == b"y" * 4096
    assert store.records() == []
    # a JSON file that is not one of our records is ignored, and never touched
    other = tmp_path / "s" / "notes.json"
    other.write_text(json.dumps({"id": "notes"}))
    assert store.records() == [] and other.exists()
    store.close()


def test_store_abandoned_capture_is_cleaned(tmp_path: Path) -> None:
    store = DirectoryStore(str(tmp_path / "s"))
    res = store.reserve("web", "core", SnapshotRecord())
    # a capture killed with SIGKILL leaves its .incomplete and a "capturing" record whose
    # process is gone
    Path(res.path + ".incomplete").write_bytes(b"partial")
    data = json.loads((tmp_path / "s" / res.sidecar).read_text())
    data["agent_pid"] = 4194000
    (tmp_path / "s" / res.sidecar).write_text(json.dumps(data))
    (rec,) = store.records()
    assert store.status(rec) == "abandoned"
    store.close()
    proc = run_agent(["prune", "-D", str(tmp_path / "s"), "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["cleaned"] == [res.id]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == []


def test_a_running_capture_of_the_same_target_is_not_overlapped(tmp_path: Path) -> None:
    store_dir = tmp_path / "s"
    store = DirectoryStore(str(store_dir))
    with store.lock_target("sleep") as got:
        assert got
        # the second taker of the same lock, in another process, is the CLI
        with subprocess.Popen(["sleep", "60"]) as sleeper:
            try:
                proc = run_agent(["capture", "process", str(sleeper.pid), "-o", f"{store_dir}/"],
                                 tmp_path)
            finally:
                sleeper.kill()
        assert proc.returncode == 75
        assert "already running" in assert_one_error_line(proc)
        lock = store_dir / ".locks" / "sleep.lock"
        with open(lock) as f, pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    store.close()
