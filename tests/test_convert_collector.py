"""DumpFileCollector without a guest: QEMU-layout ELF in, and the phys_base repair."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from kdumpling import write_dump
from kdumpling.collectors.convert import DumpFileCollector, vmcoreinfo_number

from tests import testdumps as td
from tests.readers import kdumpfile_module, lkf_open


@pytest.fixture(scope="module")
def machine() -> td.Machine:
    return td.x86_64_machine(small=True)


@pytest.mark.readers
def test_qemu_layout_elf_to_kdump(machine: td.Machine, tmp_path: Path) -> None:
    src = tmp_path / "qemu.elf"
    td.pack_elf_vmcore(src, machine, layout="qemu")
    out = tmp_path / "out.kdump"
    with DumpFileCollector(src) as snap:
        assert snap.meta["source_format"] == "elf"
        assert snap.image.cpu_count == len(machine.cpus)
        write_dump(snap.image, out, format="kdump", compression="zstd")
    kdumpfile = kdumpfile_module()
    ctx = lkf_open(str(out))
    assert bytes(ctx.attr["linux.vmcoreinfo.raw"]) == machine.vmcoreinfo
    for pfn in machine.pfns():
        assert bytes(ctx.read(kdumpfile.KDUMP_MACHPHYSADDR, pfn * td.PAGE, td.PAGE)) == \
            machine.page(pfn)


def _sub_header_phys_base(path: Path) -> int:
    # struct disk_dump_header: block_size (int) at 0x1ac; kdump_sub_header starts one block in,
    # phys_base first (makedumpfile diskdump_mod.h)
    with open(path, "rb") as f:
        head = f.read(0x1B0)
        block_size = struct.unpack_from("<i", head, 0x1AC)[0]
        f.seek(block_size)
        value: int = struct.unpack("<Q", f.read(8))[0]
    return value


def test_header_phys_base_replaced_by_vmcoreinfo(machine: td.Machine, tmp_path: Path) -> None:
    """A kdump whose sub-header phys_base disagrees with NUMBER(phys_base) (QEMU 7.2 parses
    the kernel's decimal value as hex) comes out with VMCOREINFO's value."""
    src = tmp_path / "qemu.elf"
    td.pack_elf_vmcore(src, machine, layout="qemu")
    bad = tmp_path / "bad.kdump"
    with DumpFileCollector(src) as snap:
        snap.image.phys_base = 0x222298112  # what QEMU makes of a decimal "-222298112" ...
        write_dump(snap.image, bad, format="kdump", compression="zlib")
    assert _sub_header_phys_base(bad) == 0x222298112
    fixed = tmp_path / "fixed.kdump"
    with DumpFileCollector(bad) as snap:
        assert snap.image.phys_base == 0  # NUMBER(phys_base)=0 in the machine's VMCOREINFO
        assert any("phys_base" in w for w in snap.warnings)
        write_dump(snap.image, fixed, format="kdump", compression="zlib")
    assert _sub_header_phys_base(fixed) == 0


def test_vmcoreinfo_number_forms() -> None:
    fields = {"NUMBER(phys_base)": "-222298112", "NUMBER(PHYS_OFFSET)": "0x40000000",
              "NUMBER(x)": "zz"}
    assert vmcoreinfo_number(fields, "NUMBER(phys_base)") == -222298112
    assert vmcoreinfo_number(fields, "NUMBER(PHYS_OFFSET)") == 0x40000000
    assert vmcoreinfo_number(fields, "NUMBER(x)") is None
    assert vmcoreinfo_number(fields, "NUMBER(missing)") is None


def test_not_a_dump(tmp_path: Path) -> None:
    from kdumpling.errors import FormatError

    f = tmp_path / "junk"
    f.write_bytes(b"hello world" * 100)
    with pytest.raises(FormatError), DumpFileCollector(f):
        pass
