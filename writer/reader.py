"""Read existing dumps: ELF vmcores and process cores, kdump-compressed files (also flattened).

``open_dump(path)`` sniffs the file and returns a ``Dump`` that lists segments and notes, gives the
VMCOREINFO, CPU registers and header facts, reads memory by address, walks every page for
``verify``, says whether the file is missing data (``incomplete``, ``missing``) and turns the dump
into a ``CoreImage`` whose segments read lazily, so any dump converts into any format without
being loaded into memory.

One module per format: read_elf.py (ELF), read_kdump.py (kdump-compressed), read_flat.py
(flattened records, ``reassemble_flattened``), read_stream.py (ELF on a pipe); read_base.py holds
what they share. The struct layouts are in layout.py, page decompression in codecs.py.
"""

from __future__ import annotations

import os
import stat
import struct

from .errors import FormatError, UsageError
from .layout import DISKDUMP_SIGNATURE, ELFMAG, FLAT_HEADER, FLAT_SIGNATURE, KDUMP_SIGNATURE
from .read_base import Dump, DumpSegment, PageNotDumpedError
from .read_elf import ElfDump
from .read_flat import check_flat_header, reassemble_flattened, reassemble_flattened_into
from .read_kdump import KdumpDump
from .read_stream import ElfStreamReader, open_elf_stream, read_elf_stream

__all__ = [
    "Dump",
    "DumpSegment",
    "ElfDump",
    "ElfStreamReader",
    "KdumpDump",
    "PageNotDumpedError",
    "open_dump",
    "open_elf_stream",
    "read_elf_stream",
    "reassemble_flattened",
    "reassemble_flattened_into",
]


def open_dump(path: str | os.PathLike[str]) -> Dump:
    """Open an ELF vmcore or process core, a kdump-compressed or a flattened kdump file."""
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise UsageError(f"cannot open {name}: {err.strerror}") from err
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise UsageError(
                f"{name} is not a regular file; a dump arriving on a pipe needs "
                "read_elf_stream() (ELF) or reassemble_flattened() (flattened kdump)"
            )
        magic = os.pread(fd, 16, 0)
        dump: Dump
        if magic[:4] == ELFMAG:
            dump = ElfDump(name, fd)
        elif magic[:8] == KDUMP_SIGNATURE:
            dump = KdumpDump(name, fd, flat=False)
        elif magic[:16].rstrip(b"\0") == FLAT_SIGNATURE and len(magic) == 16:
            check_flat_header(os.pread(fd, FLAT_HEADER.size, 0), name)
            dump = KdumpDump(name, fd, flat=True)
        elif magic[:8] == DISKDUMP_SIGNATURE:
            raise FormatError("legacy DISKDUMP files are not supported", 0, name)
        else:
            raise FormatError(f"not a dump file (starts with {magic[:8]!r})", 0, name)
    except struct.error as err:  # a short read the checks above did not foresee
        os.close(fd)
        raise FormatError(f"truncated structure: {err}", None, name) from None
    except BaseException:
        os.close(fd)
        raise
    return dump
