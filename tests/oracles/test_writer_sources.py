"""The seed API's data forms (issue 12 item 2): memory handed to ``add_memory_segment`` as a
path, an open binary file, a file object without a descriptor, or the internal
``FileRangeSource`` writes the same kdump file, and libkdumpfile and drgn read every byte back."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import BinaryIO

import pytest
from kdumpling import FileRangeSource, KdumpBuilder
from kdumpling.segments import FileObjectSource, make_source

from tests import tiers
from tests.readers import drgn_program, lkf_open, lkf_read_phys

PAGE = 4096
VMCI = ("OSRELEASE=6.1.0-sources\nPAGESIZE=4096\nSYMBOL(swapper_pg_dir)=ffffffff82a0c000\n"
        "NUMBER(pgtable_l5_enabled)=0\nNUMBER(phys_base)=0\n")
PHYS = 0x1000000


def ram(tmp: Path) -> tuple[Path, bytes]:
    rng = random.Random(7)
    data = b"".join(rng.choice([bytes(PAGE), rng.randbytes(PAGE), b"text line\n" * 409 + b"xx",
                                bytes(range(256)) * 16]) for _ in range(2048))
    path = tmp / "ram.img"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize("codec", ["lzo", "zlib"])
def test_every_data_form_writes_the_same_dump(tmp_path: Path, codec: str) -> None:
    tiers.codec(codec)
    path, data = ram(tmp_path)
    outputs = {}
    with open(path, "rb") as fileobj:
        fileobj.seek(12345)  # the seed reads a file object from its start, wherever it stands
        forms: dict[str, object] = {
            "path": str(path), "fileobj": fileobj, "bytesio": io.BytesIO(data),
            "internal": FileRangeSource(path, 0, len(data)),
        }
        for name, form in forms.items():
            out = tmp_path / f"{name}.kdump"
            KdumpBuilder(arch="x86_64").set_vmcoreinfo(VMCI) \
                .add_memory_segment(PHYS, form).write(  # type: ignore[arg-type]
                    out, format="kdump", compression=codec, compression_level=1, dump_level=1)
            outputs[name] = out.read_bytes()
        assert fileobj.tell() == 12345  # the caller's position is left alone
    assert len(set(outputs.values())) == 1, "the data forms wrote different files"
    out = tmp_path / "fileobj.kdump"
    ctx = lkf_open(str(out))
    assert lkf_read_phys(ctx, PHYS, len(data)) == data
    prog = drgn_program(str(out))
    assert prog.read(PHYS, len(data), True) == data


def test_file_object_sources_read_by_descriptor_or_by_seek(tmp_path: Path) -> None:
    path, data = ram(tmp_path)
    with open(path, "rb") as f:
        src = make_source(f)
        assert isinstance(src, FileObjectSource) and src.file_range() is not None
        assert src.read(5 * PAGE, 3 * PAGE) == data[5 * PAGE : 8 * PAGE]
    bio: BinaryIO = io.BytesIO(data)
    src = make_source(bio)
    assert src.file_range() is None  # no descriptor: seek and read
    assert src.read(PAGE + 7, 100) == data[PAGE + 7 : PAGE + 107]
