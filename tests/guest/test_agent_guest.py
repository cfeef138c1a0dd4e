"""kdumpling-agent against real guests: ``capture qmp``, ``capture libvirt`` and a service run
with guest targets, each snapshot verified by the agent and read back by the external readers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.agenttools import json_out, run_agent

from . import rig
from .checks import Expect, assert_readers_agree

pytestmark = [pytest.mark.guest, pytest.mark.slow]


def _qemu_running(guest: rig.QemuGuest) -> bool:
    status = rig.qmp_command(guest.qmp_path, "query-status")
    assert isinstance(status, dict)
    return status["status"] == "running"


def _verify(out_dir: Path, ident: str, store: Path) -> dict[str, object]:
    proc = run_agent(["verify", ident, "-D", str(store), "--json"], out_dir)
    assert proc.returncode == 0, proc.stderr
    result = json_out(proc)
    assert result["checks"] == {"pages": "ok", "size": "ok", "sha256": "ok"}
    return result  # type: ignore[no-any-return]


@pytest.mark.parametrize("extra", [[], ["--spool", "--qemu-format", "kdump-zlib"]],
                         ids=["stream", "spool-qemu-kdump-zlib"])
def test_agent_capture_qmp(qemu_guest: rig.QemuGuest, qemu_expect: Expect,
                           out_dir: Path, extra: list[str]) -> None:
    store = out_dir / "store"
    proc = run_agent(["capture", "qmp", str(qemu_guest.qmp_path), "-o", f"{store}/", "--json",
                      "--annotate", "case=qmp", *extra], out_dir)
    assert proc.returncode == 0, proc.stderr
    r = json_out(proc)
    assert r["kind"] == "kernel" and r["format"] == "kdump" and r["codec"] == "zlib"
    assert isinstance(r["pause_seconds"], float) and r["pause_seconds"] > 0
    assert r["bytes_in"] >= qemu_guest.mem_mb << 19  # at least half the RAM is described
    assert _qemu_running(qemu_guest)
    _verify(out_dir, r["id"], store)
    info = json_out(run_agent(["info", r["id"], "-D", str(store), "--json"], out_dir))
    assert info["dump"]["osrelease"] == qemu_expect.report.release
    assert info["dump"]["annotations"]["case"] == "qmp"
    assert_readers_agree(Path(r["path"]), qemu_expect, "kdump", "zlib", out_dir)


@pytest.mark.libvirt
def test_agent_capture_libvirt(libvirt_guest: rig.LibvirtGuest, libvirt_expect: Expect,
                               out_dir: Path) -> None:
    store = out_dir / "store"
    proc = run_agent(["capture", "libvirt", libvirt_guest.name, "--connect", libvirt_guest.uri,
                      "-o", f"{store}/", "-z", "--json"], out_dir)
    assert proc.returncode == 0, proc.stderr
    r = json_out(proc)
    assert r["kind"] == "kernel" and r["codec"] == "zstd" and r["target_key"] == libvirt_guest.name
    _verify(out_dir, r["id"], store)
    assert_readers_agree(Path(r["path"]), libvirt_expect, "kdump", "zstd", out_dir)
    gone = run_agent(["capture", "libvirt", "kdt-no-such-domain", "--connect",
                      libvirt_guest.uri, "-o", f"{store}/"], out_dir)
    assert gone.returncode == 69, gone.stderr


@pytest.mark.libvirt
def test_agent_service_once_with_guest_targets(qemu_guest: rig.QemuGuest,
                                              libvirt_guest: rig.LibvirtGuest,
                                              out_dir: Path) -> None:
    store = out_dir / "store"
    cfg = out_dir / "agent.toml"
    cfg.write_text(
        f'[output]\ndirectory = "{store}"\ncompression = "lzo"\n'
        "[retention]\nkeep = 0\nmax_use = 0\nkeep_free = 0\n"
        f'[targets.bare]\ntype = "qmp"\nsocket = "{qemu_guest.qmp_path}"\ninterval = "1h"\n'
        "spool = true\n"
        f'[targets.lv]\ntype = "libvirt"\ndomain = "{libvirt_guest.name}"\n'
        f'uri = "{libvirt_guest.uri}"\ncalendar = "daily"\nformat = "elf"\n'
        'qemu_format = "kdump-zlib"\n')
    proc = run_agent(["service", "--once", "--config", str(cfg)], out_dir)
    assert proc.returncode == 0, proc.stderr
    records = {json.loads(p.read_text())["target_key"]: json.loads(p.read_text())
               for p in store.glob("*.json")}
    assert set(records) == {"bare", "lv"}
    assert records["bare"]["codec"] == "lzo" and records["lv"]["format"] == "elf"
    assert records["bare"]["meta"]["mode"] == "spool"
    assert records["lv"]["meta"]["mode"] == "spool"
    assert records["lv"]["meta"]["dump_format"] == "kdump-zlib"
    assert not [p for p in store.iterdir() if p.name.startswith(".kdumpling-spool")]
    for rec in records.values():
        _verify(out_dir, str(rec["id"]), store)
    assert "capture target=bare result=ok" in proc.stderr
    assert "capture target=lv result=ok" in proc.stderr
