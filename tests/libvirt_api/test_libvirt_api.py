"""LibvirtCollector's API path against libvirt's in-process test driver (test:///default).

The test driver needs no daemon. What it does with dumps (measured, libvirt 9.0): a memory-only
dump is refused (VIR_ERR_INVALID_ARG "unsupported flags (0x10)"), a plain RAW dump writes the
15 bytes ``TestGuestMagic\\0`` into the path. So these tests drive the FIFO, the thread, the
error translation and the clean-up without a guest; the guest tests do the real dumps.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from kdumpling.collectors.libvirt import LibvirtCaptureError, LibvirtCollector, translate_error
from kdumpling.errors import FormatError, PermissionDeniedError, TargetGoneError

from tests import tiers

libvirt = tiers.module("libvirt", "libvirt", "pip install libvirt-python")

URI = "test:///default"


def _leftovers() -> list[str]:
    return sorted(n for n in os.listdir(tempfile.gettempdir())
                  if n.startswith("kdumpling-libvirt-"))


def test_memory_only_refused_cleanly() -> None:
    before = _leftovers()
    with pytest.raises(LibvirtCaptureError, match="unsupported flags") as err, \
            LibvirtCollector("test", uri=URI):
        pass
    assert err.value.exit_code == 74
    assert _leftovers() == before


def test_stream_reads_what_the_driver_writes() -> None:
    """The driver's 15-byte file arrives through our FIFO and the reader rejects it."""
    before = _leftovers()
    with pytest.raises(FormatError, match="ELF header") as err, \
            LibvirtCollector("test", uri=URI, memory_only=False):
        pass
    assert err.value.offset == len(b"TestGuestMagic\0")  # every byte came through the FIFO
    assert _leftovers() == before


def test_spool_reads_what_the_driver_writes(tmp_path: Path) -> None:
    with pytest.raises(FormatError), \
            LibvirtCollector("test", uri=URI, memory_only=False, spool=str(tmp_path)):
        pass
    assert os.listdir(tmp_path) == []


def test_lookup_by_uuid() -> None:
    conn = libvirt.open(URI)
    uuid = conn.lookupByName("test").UUIDString()
    conn.close()
    with pytest.raises(FormatError), LibvirtCollector(uuid, uri=URI, memory_only=False):
        pass


def test_unknown_domain() -> None:
    with pytest.raises(TargetGoneError, match="no-such-vm") as err, \
            LibvirtCollector("no-such-vm", uri=URI):
        pass
    assert err.value.exit_code == 69


def test_no_daemon(tmp_path: Path) -> None:
    uri = f"qemu+unix:///system?socket={tmp_path}/nope.sock"
    with pytest.raises(TargetGoneError, match="cannot connect"), LibvirtCollector("x", uri=uri):
        pass


def test_shut_off_domain() -> None:
    """A defined but inactive domain is 'gone' for a capture. (test:///default keeps its state
    while any connection of the process is open, so ours sees what this one did.)"""
    conn = libvirt.open(URI)
    try:
        dom = conn.lookupByName("test")
        dom.destroy()
        with pytest.raises(TargetGoneError, match="not running"), \
                LibvirtCollector("test", uri=URI):
            pass
        dom.create()
    finally:
        conn.close()


@pytest.mark.parametrize(("code", "kind"), [
    ("VIR_ERR_NO_DOMAIN", TargetGoneError),
    ("VIR_ERR_ACCESS_DENIED", PermissionDeniedError),
    ("VIR_ERR_AUTH_FAILED", PermissionDeniedError),
    ("VIR_ERR_OPERATION_UNSUPPORTED", LibvirtCaptureError),
    ("VIR_ERR_INTERNAL_ERROR", LibvirtCaptureError),
])
def test_error_translation(code: str, kind: type[Exception]) -> None:
    err = libvirt.libvirtError("boom")
    err.err = (getattr(libvirt, code), libvirt.VIR_FROM_QEMU, "boom", 2, None, None, None, 0, 0)
    assert isinstance(translate_error(err, "dump"), kind)
