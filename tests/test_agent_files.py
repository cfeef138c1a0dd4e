"""The agent on dump files, no live process needed: codec levels on the command line and in the
config, ``info``/``verify`` of empty dumps, and ``verify`` naming what a cut dump is missing
(from the reader's ``Dump.incomplete``/``Dump.missing``, not from its warning text)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
from kdumpling import KdumpBuilder
from kdumpling.reader import open_dump

from tests import testdumps, tiers
from tests.agenttools import assert_one_error_line, json_out, run_agent

VMCI = "OSRELEASE=6.1.0-files\nPAGESIZE=4096\n"
FORMATS = ("elf", "kdump", "kdump-flat")


def _vmcore(tmp: Path) -> tuple[Path, testdumps.Machine]:
    m = testdumps.x86_64_machine()
    path = tmp / "in.vmcore"
    testdumps.pack_elf_vmcore(path, m)
    return path, m


def test_compression_level_reaches_the_writer(tmp_path: Path) -> None:
    vmcore, m = _vmcore(tmp_path)
    sizes = {}
    for level in (1, 9):
        out = tmp_path / f"l{level}.kdump"
        proc = run_agent(["convert", str(vmcore), str(out), "-c", "--compression-level",
                          str(level), "--json"], tmp_path)
        assert proc.returncode == 0, proc.stderr
        r = json_out(proc)
        assert r["compression_level"] == level and r["codec"] == "zlib"
        sizes[level] = out.stat().st_size
        with open_dump(out) as d:
            pages = dict(d.iter_pages())
        for pfn in m.pfns():
            assert pages.get(pfn, bytes(testdumps.PAGE)) == m.page(pfn), hex(pfn)
    assert sizes[9] <= sizes[1]  # zlib: a higher level never gives a larger file


@pytest.mark.parametrize("level", ["0", "10", "-1", "fast"])
def test_compression_level_out_of_range_is_a_usage_error(tmp_path: Path, level: str) -> None:
    vmcore, _m = _vmcore(tmp_path)
    for cmd in (["convert", str(vmcore), str(tmp_path / "x.kdump")],
                ["capture", "process", "1", "-o", str(tmp_path / "x.core")]):
        proc = run_agent([*cmd, f"--compression-level={level}"], tmp_path)
        assert proc.returncode == 2, proc.stderr
        line = assert_one_error_line(proc)
        assert "--compression-level" in line
        if level.lstrip("-").isdigit():
            assert "1-9" in line
    assert not (tmp_path / "x.kdump").exists()


def test_compression_level_in_the_config(tmp_path: Path) -> None:
    tiers.codec("zstd")
    vmcore, _m = _vmcore(tmp_path)
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[output]\ncompression_level = 10\n")
    bad = run_agent(["convert", str(vmcore), str(tmp_path / "x.kdump"), "--config", str(cfg)],
                    tmp_path)
    assert bad.returncode == 78
    assert "output.compression_level: must be between 1 and 9, got 10" in \
        assert_one_error_line(bad)
    cfg.write_text('[output]\ncompression = "zstd"\ncompression_level = 7\n')
    ok = run_agent(["convert", str(vmcore), str(tmp_path / "x.kdump"), "--config", str(cfg),
                    "--json"], tmp_path)
    assert ok.returncode == 0, ok.stderr
    r = json_out(ok)
    assert r["codec"] == "zstd" and r["compression_level"] == 7
    # the command line wins over the config
    again = run_agent(["convert", str(vmcore), str(tmp_path / "y.kdump"), "--config", str(cfg),
                       "--compression-level", "2", "--json"], tmp_path)
    assert json_out(again)["compression_level"] == 2


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("with_vmcoreinfo", [True, False], ids=["vmcoreinfo", "nothing"])
def test_info_and_verify_report_zero_pages_for_empty_dumps(tmp_path: Path, fmt: str,
                                                          with_vmcoreinfo: bool) -> None:
    path = tmp_path / f"empty.{fmt}"
    builder = KdumpBuilder()
    if with_vmcoreinfo:
        builder.set_vmcoreinfo(VMCI)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the writer's own warning about a dump without memory
        builder.write(str(path), format=fmt)
    info = run_agent(["info", str(path), "--json"], tmp_path)
    assert info.returncode == 0, info.stderr
    dump = json_out(info)["dump"]
    assert dump["memory_bytes"] == 0 and dump["format"] == fmt
    assert dump["osrelease"] == ("6.1.0-files" if with_vmcoreinfo else None)
    verify = run_agent(["verify", str(path), "--json"], tmp_path)
    assert verify.returncode == 0, verify.stderr
    v = json_out(verify)
    assert v["ok"] and v["pages"] == 0 and v["bytes"] == 0 and v["missing"] == []
    human = run_agent(["verify", str(path)], tmp_path)
    assert human.returncode == 0 and "0 pages" in human.stdout


@pytest.mark.parametrize("fmt", FORMATS)
def test_verify_names_the_missing_ranges_of_a_cut_dump(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"cut.{fmt}"
    KdumpBuilder().set_vmcoreinfo(VMCI).add_memory_segment(
        0x100000, os.urandom(64 * 4096)).write(str(path), format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with open_dump(path) as d:
        assert d.incomplete
        want = [{"start": a, "end": b} for a, b in d.missing]
    proc = run_agent(["verify", str(path), "--json"], tmp_path)
    assert proc.returncode == 65
    v = json_out(proc)
    assert v["incomplete"] is True and v["missing"] == want and v["checks"]["pages"] == "failed"
    line = assert_one_error_line(run_agent(["verify", str(path)], tmp_path))
    assert "incomplete dump" in line
    if want:
        assert f"{want[0]['start']:#x}-{want[0]['end']:#x}" in line


def test_verify_of_a_file_that_is_no_dump_names_it_once(tmp_path: Path) -> None:
    path = tmp_path / "garbage.bin"
    path.write_bytes(b"\x8c\xcc" + bytes(4094))
    proc = run_agent(["verify", str(path)], tmp_path)
    assert proc.returncode == 65
    line = assert_one_error_line(proc)
    assert line.count(str(path)) == 1 and "not a dump file" in line, line


def test_a_library_warning_is_one_line(tmp_path: Path) -> None:
    """The writer's warning about a dump without memory: one agent line, not Python's two."""
    empty = tmp_path / "empty.kdump"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        KdumpBuilder().set_vmcoreinfo(VMCI).write(str(empty), format="kdump")
    proc = run_agent(["convert", str(empty), str(tmp_path / "out.kdump")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("kdumpling-agent: warning: "), proc.stderr
    assert "without memory" in lines[0] and ".py" not in lines[0]
