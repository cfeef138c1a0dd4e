"""Per-architecture facts: ELF machine, byte order, page size and the NT_PRSTATUS layout.

The register layouts are the kernel's ``elf_gregset_t`` (``pr_reg`` inside ``struct elf_prstatus``):
  x86_64   arch/x86/include/asm/user_64.h            struct user_regs_struct  (27 x u64)
  aarch64  arch/arm64/include/uapi/asm/ptrace.h      struct user_pt_regs      (34 x u64)
  s390x    arch/s390/include/asm/elf.h, ptrace.h     s390_regs: psw, gprs, acrs (u32), orig_gpr2
  ppc64    arch/powerpc/include/uapi/asm/elf.h       ELF_NGREG = 48 x u64 (44 named)
  riscv64  arch/riscv/include/uapi/asm/ptrace.h      struct user_regs_struct  (32 x u64)
``struct elf_prstatus`` is a 112-byte common prefix, ``pr_reg``, an int ``pr_fpvalid`` and tail
padding to 8 bytes: 336 / 392 / 336 / 504 / 376 bytes (include/linux/elfcore.h; QEMU's
target/*/arch_dump.c asserts the same sizes).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from .errors import UnsupportedArchError, UsageError

# e_machine values (include/uapi/linux/elf-em.h)
EM_S390 = 22
EM_PPC64 = 21
EM_X86_64 = 62
EM_AARCH64 = 183
EM_RISCV = 243

PRSTATUS_REG_OFFSET = 112  # offsetof(struct elf_prstatus, pr_reg) on every LP64 arch


class X86_64Reg(IntEnum):
    """Slots of x86_64 ``struct user_regs_struct``, in pr_reg order."""

    R15 = 0
    R14 = 1
    R13 = 2
    R12 = 3
    RBP = 4
    RBX = 5
    R11 = 6
    R10 = 7
    R9 = 8
    R8 = 9
    RAX = 10
    RCX = 11
    RDX = 12
    RSI = 13
    RDI = 14
    ORIG_RAX = 15
    RIP = 16
    CS = 17
    EFLAGS = 18
    RSP = 19
    SS = 20
    FS_BASE = 21
    GS_BASE = 22
    DS = 23
    ES = 24
    FS = 25
    GS = 26


AArch64Reg = IntEnum(  # type: ignore[misc]
    "AArch64Reg",
    [(f"X{i}", i) for i in range(31)] + [("SP", 31), ("PC", 32), ("PSTATE", 33)],
)
AArch64Reg.__doc__ = "Slots of arm64 ``struct user_pt_regs``: x0..x30, sp, pc, pstate."

S390xReg = IntEnum(  # type: ignore[misc]
    "S390xReg",
    [("PSW_MASK", 0), ("PSW_ADDR", 1)]
    + [(f"R{i}", 2 + i) for i in range(16)]
    + [(f"A{i}", 18 + i) for i in range(16)]
    + [("ORIG_GPR2", 34)],
)
S390xReg.__doc__ = "Slots of s390 ``s390_regs``: psw mask/addr, r0..r15, a0..a15, orig_gpr2."

Ppc64Reg = IntEnum(  # type: ignore[misc]
    "Ppc64Reg",
    [(f"R{i}", i) for i in range(32)]
    + [
        (name, 32 + i)
        for i, name in enumerate(
            ["NIP", "MSR", "ORIG_GPR3", "CTR", "LINK", "XER", "CCR", "SOFTE", "TRAP", "DAR",
             "DSISR", "RESULT"]
        )
    ],
)
Ppc64Reg.__doc__ = "Named slots of powerpc ``pt_regs`` as dumped (44 of ELF_NGREG = 48)."

RiscV64Reg = IntEnum(  # type: ignore[misc]
    "RiscV64Reg",
    [
        (name, i)
        for i, name in enumerate(
            ["PC", "RA", "SP", "GP", "TP", "T0", "T1", "T2", "S0", "S1", "A0", "A1", "A2", "A3",
             "A4", "A5", "A6", "A7", "S2", "S3", "S4", "S5", "S6", "S7", "S8", "S9", "S10",
             "S11", "T3", "T4", "T5", "T6"]
        )
    ],
)
RiscV64Reg.__doc__ = "Slots of riscv ``struct user_regs_struct``: pc, ra, sp, gp, tp, t0.. t6."

# Alternative spellings accepted in register dicts (ABI names people use).
_REG_ALIASES: dict[str, dict[str, str]] = {
    "aarch64": {"X29": "X29", "FP": "X29", "LR": "X30", "CPSR": "PSTATE"},
    "riscv64": {"FP": "S0", **{f"X{i}": n for i, n in enumerate(
        ["PC", "RA", "SP", "GP", "TP", "T0", "T1", "T2", "S0", "S1", "A0", "A1", "A2", "A3", "A4",
         "A5", "A6", "A7", "S2", "S3", "S4", "S5", "S6", "S7", "S8", "S9", "S10", "S11", "T3",
         "T4", "T5", "T6"]) if i > 0}},
    "ppc64": {**{f"GPR{i}": f"R{i}" for i in range(32)}, "LR": "LINK", "PC": "NIP", "SP": "R1"},
    "s390x": {**{f"GPR{i}": f"R{i}" for i in range(16)}, "PC": "PSW_ADDR", "SP": "R15"},
    "x86_64": {"RFLAGS": "EFLAGS"},
}


@dataclass(frozen=True)
class ArchInfo:
    """What the writers need to know about one architecture."""

    name: str  # canonical kdumpling name
    machine: int  # ELF e_machine
    endian: str  # struct byte-order prefix: "<" or ">"
    default_page_size: int  # used when VMCOREINFO has no PAGESIZE
    uts_machine: str  # utsname.machine as libkdumpfile's machine_arch_name() knows it
    regs: type[IntEnum]  # register slot enum
    reg_format: str  # struct format of pr_reg, without byte order
    prstatus_size: int  # sizeof(struct elf_prstatus)

    @property
    def big_endian(self) -> bool:
        return self.endian == ">"

    @property
    def reg_bytes(self) -> int:
        return struct.calcsize(self.endian + self.reg_format)

    def register_slot(self, name: str | IntEnum) -> int:
        """Slot index of a register given by enum member or (case-insensitive) name."""
        if isinstance(name, IntEnum):
            if type(name) is not self.regs:
                raise UsageError(f"register {name!r} does not belong to {self.name}")
            return int(name)
        key = str(name).upper()
        key = _REG_ALIASES.get(self.name, {}).get(key, key)
        try:
            return int(self.regs[key])
        except KeyError:
            known = ", ".join(m.name for m in self.regs)
            raise UsageError(
                f"unknown {self.name} register {name!r}; known registers: {known}"
            ) from None



def _arch(name: str, machine: int, endian: str, page: int, uts: str, regs: type[IntEnum],
          reg_format: str, size: int) -> ArchInfo:
    info = ArchInfo(name, machine, endian, page, uts, regs, reg_format, size)
    # The kernel's struct: prefix + pr_reg + int pr_fpvalid, padded to 8.
    expect = PRSTATUS_REG_OFFSET + info.reg_bytes + 4
    expect += -expect % 8
    assert expect == size, (name, expect, size)
    return info


ARCHITECTURES: dict[str, ArchInfo] = {
    "x86_64": _arch("x86_64", EM_X86_64, "<", 4096, "x86_64", X86_64Reg, "27Q", 336),
    "aarch64": _arch("aarch64", EM_AARCH64, "<", 4096, "aarch64", AArch64Reg, "34Q", 392),
    "s390x": _arch("s390x", EM_S390, ">", 4096, "s390x", S390xReg, "18Q16IQ", 336),
    # 64 KiB pages are the usual ppc64 kernel configuration (CONFIG_PPC_64K_PAGES).
    "ppc64": _arch("ppc64", EM_PPC64, ">", 65536, "ppc64", Ppc64Reg, "48Q", 504),
    "ppc64le": _arch("ppc64le", EM_PPC64, "<", 65536, "ppc64le", Ppc64Reg, "48Q", 504),
    "riscv64": _arch("riscv64", EM_RISCV, "<", 4096, "riscv64", RiscV64Reg, "32Q", 376),
}

ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "x86-64": "x86_64"}


def get_arch(name: str) -> ArchInfo:
    """Look up an architecture by name or alias; unknown names raise UnsupportedArchError."""
    canonical = ARCH_ALIASES.get(name, name)
    try:
        return ARCHITECTURES[canonical]
    except KeyError:
        supported = ", ".join(sorted([*ARCHITECTURES, "arm64"]))
        raise UnsupportedArchError(
            f"Unsupported architecture: {name}. Supported: {supported}"
        ) from None


def arch_from_machine(machine: int, big_endian: bool) -> ArchInfo:
    """The architecture of an ELF file from e_machine and EI_DATA."""
    for info in ARCHITECTURES.values():
        if info.machine == machine and info.big_endian == big_endian:
            return info
    order = "big" if big_endian else "little"
    raise UnsupportedArchError(f"unsupported ELF machine {machine} ({order}-endian)")


# --- phys_base: where the kernel was loaded ------------------------------------------------------
# The VMCOREINFO key carrying the kernel's physical load offset, per architecture
# (arch/x86/kernel/machine_kexec_64.c arch_crash_save_vmcoreinfo; arch/arm64/kernel/
# vmcore_info.c). makedumpfile copies the same value into the kdump sub-header's phys_base
# (arch/x86_64.c get_phys_base_x86_64, arch/arm64.c get_phys_base_arm64).
PHYS_BASE_KEYS: dict[str, str] = {"x86_64": "NUMBER(phys_base)",
                                  "aarch64": "NUMBER(PHYS_OFFSET)"}
_U64 = (1 << 64) - 1


def parse_vmcoreinfo_number(value: str) -> int:
    """A VMCOREINFO ``NUMBER()`` value; ValueError when it is none.

    The kernel prints ``%ld`` in decimal (include/linux/vmcore_info.h VMCOREINFO_NUMBER), so
    x86_64's phys_base is negative when KASLR loads the kernel below its link address; some
    arm64 keys are printed as ``0x`` hex (arch/arm64/kernel/vmcore_info.c).
    """
    text = value.strip()
    try:
        return int(text, 0)
    except ValueError:
        return int(text, 10)  # "-0123": base 0 refuses leading zeros


def vmcoreinfo_phys_base(arch: str, fields: dict[str, str]) -> int | None:
    """The kernel's own phys_base (signed) from VMCOREINFO fields; None if absent or garbled."""
    key = PHYS_BASE_KEYS.get(ARCH_ALIASES.get(arch, arch))
    if key is None or key not in fields:
        return None
    try:
        return parse_vmcoreinfo_number(fields[key])
    except ValueError:
        return None


def phys_base_u64(value: int) -> int:
    """phys_base as the 64-bit sub-header field holds it (two's complement when negative)."""
    return value & _U64


def qemu_header_phys_base(value: str) -> int | None:
    """What QEMU writes into its kdump sub-header for the VMCOREINFO text ``value``.

    QEMU reads the kernel's decimal number as hex (dump/dump.c vmcoreinfo_update_phys_base:
    ``qemu_strtou64(..., 16)``, a leading minus wrapping modulo 2**64), so "-222298112" becomes
    0xfffffffdddd67eee. None when even that parse fails (QEMU then keeps its own guess).
    """
    try:
        return phys_base_u64(int(value.strip(), 16))
    except ValueError:
        return None


# --- register sets of a process core -----------------------------------------------------------
# Per thread the kernel writes one note per regset of the task's user_regset_view that has a
# core note type and is active (fs/binfmt_elf.c fill_thread_core_info). Every architecture
# here starts with NT_PRSTATUS and NT_PRFPREG (kdumpling.notes); the types below follow them.
# Note types: include/uapi/linux/elf.h.
NT_386_IOPERM = 0x201
NT_X86_XSTATE = 0x202
NT_X86_SHSTK = 0x204
NT_ARM_TLS = 0x401
NT_ARM_HW_BREAK = 0x402
NT_ARM_HW_WATCH = 0x403
NT_ARM_SYSTEM_CALL = 0x404
NT_ARM_SVE = 0x405
NT_ARM_PAC_MASK = 0x406
NT_ARM_TAGGED_ADDR_CTRL = 0x409
NT_ARM_PAC_ENABLED_KEYS = 0x40A
NT_ARM_SSVE = 0x40B
NT_ARM_ZA = 0x40C
NT_ARM_ZT = 0x40D
NT_ARM_FPMR = 0x40E
NT_ARM_POE = 0x40F
NT_ARM_GCS = 0x410
NT_RISCV_CSR = 0x900
NT_RISCV_VECTOR = 0x901


@dataclass(frozen=True)
class ArchRegsets:
    """What a process collector must know about an architecture's threads."""

    sp_register: str  # the stack pointer's name in the arch's register enum
    regsets: tuple[int, ...]  # note types after NT_PRSTATUS and NT_PRFPREG, in view order


# Adding an architecture = one line here. PAC keys (NT_ARM_PACA_KEYS/PACG_KEYS) are left out
# on purpose: they are secrets gdb does not need.
REGSETS: dict[str, ArchRegsets] = {
    # arch/x86/kernel/ptrace.c x86_64_regsets
    "x86_64": ArchRegsets("RSP", (NT_386_IOPERM, NT_X86_XSTATE, NT_X86_SHSTK)),
    # arch/arm64/kernel/ptrace.c aarch64_regsets
    "aarch64": ArchRegsets("SP", (
        NT_ARM_TLS, NT_ARM_HW_BREAK, NT_ARM_HW_WATCH, NT_ARM_SYSTEM_CALL, NT_ARM_SVE,
        NT_ARM_SSVE, NT_ARM_ZA, NT_ARM_ZT, NT_ARM_PAC_MASK, NT_ARM_PAC_ENABLED_KEYS,
        NT_ARM_TAGGED_ADDR_CTRL, NT_ARM_FPMR, NT_ARM_POE, NT_ARM_GCS,
    )),
    # arch/riscv/kernel/ptrace.c riscv_user_regset
    "riscv64": ArchRegsets("SP", (NT_RISCV_VECTOR,)),
}
DEFAULT_REGSETS = ArchRegsets("SP", ())  # an architecture without an entry: the two classic ones
