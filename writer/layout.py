"""The on-disk struct layouts and flag bits of every format, declared once for the writers and
the reader (logic lives elsewhere, as in pyelftools).

Layouts (dump-formats.md §2, §3): ELF64 per the gABI (include/uapi/linux/elf.h); the
kdump-compressed header, sub-header, page descriptors and status bits per makedumpfile
diskdump_mod.h; the flattened stream per makedumpfile.h makedumpfile_header/_data_header.
Each struct is keyed by byte order ("<" or ">"): dumps use the dumped machine's.
"""

from __future__ import annotations

import struct

# --- ELF64 (gABI) ------------------------------------------------------------------------------
ELFMAG = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB, ELFDATA2MSB = 1, 2
EV_CURRENT = 1
ET_CORE = 4
PT_LOAD, PT_NOTE = 1, 4
PN_XNUM = 0xFFFF
# makedumpfile sets this in e_flags of ELF output it had to cut short; crash warns on it
# (makedumpfile.c check_and_modify_elf_headers, crash netdump.c).
DUMP_ELF_INCOMPLETE = 0x1
EHDR = {e: struct.Struct(e + "16sHHIQQQIHHHHHH") for e in "<>"}  # Elf64_Ehdr
PHDR = {e: struct.Struct(e + "IIQQQQQQ") for e in "<>"}  # Elf64_Phdr
SHDR = {e: struct.Struct(e + "IIQQQQIIQQ") for e in "<>"}  # Elf64_Shdr
EHDR_SIZE, PHDR_SIZE, SHDR_SIZE = EHDR["<"].size, PHDR["<"].size, SHDR["<"].size  # 64, 56, 64

# --- kdump-compressed (makedumpfile diskdump_mod.h) --------------------------------------------
KDUMP_SIGNATURE = b"KDUMP   "
DISKDUMP_SIGNATURE = b"DISKDUMP"  # the pre-kdump diskdump format (different sub-header)
KDUMP_HEADER_VERSION = 6
NEW_UTS_LEN = 64  # each utsname field is char[65]
# struct disk_dump_header (64-bit): signature, header_version, utsname (6 x 65), 6 bytes of
# padding, struct timeval {tv_sec, tv_usec}, status, block_size, sub_hdr_size, bitmap_blocks,
# max_mapnr, total_ram_blocks, device_blocks, written_blocks, current_cpu, nr_cpus.
DISK_DUMP_HEADER = {e: struct.Struct(e + "8si65s65s65s65s65s65s6xqqIiiIIIIIIi") for e in "<>"}
# struct kdump_sub_header (header_version 6)
KDUMP_SUB_HEADER = {e: struct.Struct(e + "QiiQQqQqQqQQQQ") for e in "<>"}
# struct page_desc {off_t offset; unsigned int size, flags; unsigned long long page_flags}
PAGE_DESC = {e: struct.Struct(e + "qIIQ") for e in "<>"}
# disk_dump_header.status and page_desc.flags bits. zstd is 0x20: 0x08 means incomplete.
DUMP_DH_COMPRESSED_ZLIB = 0x01
DUMP_DH_COMPRESSED_LZO = 0x02
DUMP_DH_COMPRESSED_SNAPPY = 0x04
DUMP_DH_COMPRESSED_INCOMPLETE = 0x08
DUMP_DH_EXCLUDED_VMEMMAP = 0x10
DUMP_DH_COMPRESSED_ZSTD = 0x20

# --- flattened (makedumpfile.h) ----------------------------------------------------------------
# struct makedumpfile_header {char signature[16]; int64_t type; int64_t version;} padded to
# 4096 bytes; each record is struct makedumpfile_data_header {int64_t offset, buf_size}, in
# big-endian whatever the host (write_buffer byte-swaps on little-endian hosts). An
# {-1, -1} record ends the stream (END_FLAG_FLAT_HEADER).
FLAT_SIGNATURE = b"makedumpfile"
FLAT_HEADER_SIZE = 4096
FLAT_TYPE = 1
FLAT_VERSION = 1
FLAT_HEADER = struct.Struct(">16sqq")
FLAT_RECORD = struct.Struct(">qq")
FLAT_END = b"\xff" * FLAT_RECORD.size
