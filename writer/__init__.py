"""kdumpling: write Linux crash dumps (ELF vmcores and process cores, makedumpfile's
kdump-compressed format) that crash, drgn, libkdumpfile, makedumpfile and gdb open."""

from .arch import AArch64Reg, Ppc64Reg, RiscV64Reg, S390xReg, X86_64Reg
from .builder import DumpStats, KdumpBuilder
from .codecs import CompressionType
from .dump import OutputFormat, WriteResult, write_dump
from .errors import (
    CodecUnavailableError,
    DumpWriteError,
    EmptyDumpWarning,
    FormatError,
    KdumplingError,
    KdumplingWarning,
    LayoutError,
    NoteTypeWarning,
    SourceReadError,
    UsageError,
)
from .image import CoreImage, DumpKind
from .notes import CpuContext, CustomNote, CustomNoteType, Note
from .segments import (
    BytesSource,
    CallableSource,
    FdRangeSource,
    FileObjectSource,
    FileRangeSource,
    MemorySegment,
    ZeroSource,
)

__version__ = "0.5.0"

__all__ = [
    "AArch64Reg", "BytesSource", "CallableSource", "CodecUnavailableError", "CompressionType",
    "CoreImage", "CpuContext", "CustomNote", "CustomNoteType", "DumpKind", "DumpStats",
    "DumpWriteError", "EmptyDumpWarning", "FdRangeSource", "FileObjectSource", "FileRangeSource",
    "FormatError",
    "KdumpBuilder", "KdumplingError", "KdumplingWarning", "LayoutError", "MemorySegment", "Note",
    "NoteTypeWarning", "OutputFormat",
    "Ppc64Reg", "RiscV64Reg", "S390xReg", "SourceReadError", "UsageError", "WriteResult",
    "X86_64Reg", "ZeroSource", "write_dump",
]
