"""Target types: one class per kind of thing the agent captures, in one registry.

Each class knows its config keys (``from_config``), its command-line arguments (``add_arguments``
and ``from_args``) and how to open its collector (``open``), so the config, the ``capture`` and
``convert`` commands and the service all go through the same code. Instances are frozen: what a
capture found out about its target (the PID a name resolved to, the executable) comes back in
``Opened``, never written into the target.

Collectors are imported only when a target of their kind is opened, so the CLI keeps working
when an optional dependency (libvirt-python, qemu.qmp) or a collector module is missing; the error
then says what to install.
"""

from __future__ import annotations

import argparse
import importlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

from kdumpling.collectors.base import GUEST_DUMP_FORMATS, Collector
from kdumpling.errors import UsageError
from kdumpling.image import DumpKind

from .checker import Checker
from .record import slug
from .units import parse_size

DEFAULT_LIBVIRT_URI = "qemu:///system"


class FeatureUnavailableError(UsageError):
    """An optional part of kdumpling (a collector or its dependency) is not installed."""


_EXTRAS = {
    "libvirt": ("libvirt", "pip install 'kdumpling[libvirt]' (or apt install python3-libvirt)"),
    "qmp": ("qemu", "pip install 'kdumpling[qmp]'"),
}


def import_collector(kind: str, module: str) -> ModuleType:
    """A collector module, imported now (see the module docstring for why not at the top)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        dep = _EXTRAS.get(kind)
        if dep and err.name and err.name.split(".")[0] == dep[0]:
            raise FeatureUnavailableError(f"{kind} support needs: {dep[1]}") from None
        raise FeatureUnavailableError(
            f"{kind} capture is not available in this kdumpling install "
            f"(module {module} is missing)") from None


@dataclass(frozen=True)
class OpenContext:
    """What a target needs from where its capture goes."""

    spool_dir: str  # guests that spool put their anonymous file on this file system


@dataclass(frozen=True)
class Opened:
    """A collector, not entered yet, and what opening it found out about the target."""

    collector: Collector
    pid: int | None = None
    exe: str | None = None


@dataclass(frozen=True, kw_only=True)
class Target(ABC):
    """One thing to capture. ``key`` groups snapshots (IDs, locks, retention); ``label`` is for
    people and logs."""

    type_name: ClassVar[str]
    kind: ClassVar[DumpKind | None]  # what it captures, known before the collector runs
    help: ClassVar[str]
    description: ClassVar[str]
    in_config: ClassVar[bool] = True  # may be a [targets.NAME] table

    key: str
    label: str

    @classmethod
    @abstractmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Its own command-line arguments (``capture TYPE ...``)."""

    @classmethod
    @abstractmethod
    def from_args(cls, args: argparse.Namespace) -> Target:
        """The target the parsed command line names."""

    @classmethod
    def from_config(cls, name: str, c: Checker) -> Target:
        """The target a ``[targets.NAME]`` table describes (its type-specific keys only)."""
        raise c.fail("type", f"{cls.type_name} targets cannot be configured")

    @abstractmethod
    def open(self, ctx: OpenContext) -> Opened:
        """A collector for this target (TargetGoneError when it is not there)."""


# -- process ----------------------------------------------------------------------------------

PROCESS_SELECTORS = ("pid", "pid_file", "process", "unit")
MODES = ("consistent", "low-pause")


@dataclass(frozen=True, kw_only=True)
class ProcessTarget(Target):
    type_name = "process"
    kind = DumpKind.PROCESS
    help = "a live process (PID or name)"
    description = ("Snapshot a live process into an ELF core gdb can open. Needs ptrace rights "
                   "over it (same user, or CAP_SYS_PTRACE).")

    pid: int | None = None
    pid_file: str | None = None
    process: str | None = None
    unit: str | None = None
    select: str = "oldest"  # several matches: oldest | newest | only (a usage error)
    mode: str | None = None
    filter: int | None = None
    size_cap: int | None = None

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("target", metavar="PID|NAME")
        which = parser.add_mutually_exclusive_group()
        which.add_argument("--oldest", dest="select", action="store_const", const="oldest",
                           help="if several processes have that name, take the oldest")
        which.add_argument("--newest", dest="select", action="store_const", const="newest",
                           help="... the newest")
        parser.add_argument("--mode", choices=MODES,
                            help="consistent: stopped for the whole read (default); low-pause: "
                                 "stopped only for registers and stacks (exit 1: memory may be "
                                 "torn)")
        parser.add_argument("--filter", type=lambda s: int(s, 0), metavar="MASK",
                            help="coredump_filter bits (default: the process's own)")
        parser.add_argument("--size-cap", metavar="SIZE",
                            help="stop after SIZE bytes (truncated core)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ProcessTarget:
        """A PID is taken as is; a name must match one process unless --oldest/--newest."""
        size_cap = None
        if args.size_cap:
            try:
                size_cap = parse_size(args.size_cap)
            except ValueError as err:
                raise UsageError(f"--size-cap: {err}") from None
        common: dict[str, Any] = {"mode": args.mode, "filter": args.filter, "size_cap": size_cap,
                                  "select": args.select or "only"}
        target = str(args.target)
        if target.isdigit():
            from . import processes  # imported here (psutil): start-up time (issue 12)
            pid = int(target)
            name = processes.comm(pid) or str(pid)
            return cls(key=slug(name), label=f"process {pid} ({name})", pid=pid, **common)
        return cls(key=slug(target), label=f"process {target}", process=target, **common)

    @classmethod
    def from_config(cls, name: str, c: Checker) -> ProcessTarget:
        given = [k for k in PROCESS_SELECTORS if c.has(k)]
        if len(given) != 1:
            key = given[1] if len(given) > 1 else "process"
            raise c.fail(key, "set exactly one of pid, pid_file, process, unit")
        sel = given[0]
        found: dict[str, Any] = {}
        if sel == "pid":
            found["pid"] = c.integer("pid", 1, 2**22)
        else:
            value = c.string(sel)
            if sel == "pid_file" and value and not os.path.isabs(value):
                raise c.fail(sel, f"must be an absolute path, got {value!r}")
            found[sel] = value
        what = {"pid": "pid", "pid_file": "pid file", "process": "process", "unit": "unit"}[sel]
        return cls(key=name, label=f"{name} ({what} {found[sel]})", **found,
                   select=c.string("select", "oldest", ("oldest", "newest")) or "oldest",
                   mode=c.string("mode", None, MODES),
                   filter=c.integer("filter", 0, 0x1FF), size_cap=c.size("size_cap"))

    def resolve(self, proc: str = "/proc") -> int:
        """The PID this target means right now (TargetGoneError when there is none)."""
        from . import processes  # imported here (psutil): start-up time (issue 12)
        if self.pid is not None:
            return processes.running_pid(self.pid, proc)
        if self.pid_file:
            return processes.pid_from_file(self.pid_file, proc)
        if self.unit:
            return processes.pid_of_unit(self.unit, self.select, proc)
        return processes.pid_by_name(self.process or "", self.select, proc)

    def open(self, ctx: OpenContext) -> Opened:
        from . import processes  # imported here (psutil): start-up time (issue 12)
        pid = self.resolve()  # a missing target is 69 even where the collector is missing
        mod = import_collector("process", "kdumpling.collectors.process")
        kwargs = {k: v for k, v in (("mode", self.mode), ("filter_mask", self.filter),
                                    ("size_cap", self.size_cap)) if v is not None}
        return Opened(mod.ProcessCollector(pid, **kwargs), pid=pid, exe=processes.exe(pid))


# -- guests -----------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class GuestTarget(Target):
    """A QEMU guest: it can spool (copy first, shorter pause) and ask QEMU for kdump-zlib."""

    kind = DumpKind.KERNEL

    spool: bool = False
    dump_format: str = "elf"  # what QEMU writes, GUEST_DUMP_FORMATS

    @property
    def spools(self) -> bool:
        return self.spool or self.dump_format != "elf"  # QEMU's kdump-zlib is always spooled

    def spool_dir(self, ctx: OpenContext) -> str | None:
        return ctx.spool_dir if self.spools else None

    @staticmethod
    def add_guest_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--spool", action="store_true",
                            help="copy the guest to an anonymous temporary file first, zero "
                                 "pages as holes, and convert after (shorter pause)")
        parser.add_argument("--qemu-format", choices=GUEST_DUMP_FORMATS, default="elf",
                            help="what QEMU writes: its ELF (default) or its kdump-zlib (QEMU "
                                 "compresses on one core: the pause is QEMU's own; implies "
                                 "--spool)")

    @staticmethod
    def guest_config(c: Checker) -> dict[str, Any]:
        """``spool`` and ``qemu_format``, as the CLI's --spool and --qemu-format."""
        return {"dump_format": c.string("qemu_format", "elf", GUEST_DUMP_FORMATS) or "elf",
                "spool": c.boolean("spool", False)}


@dataclass(frozen=True, kw_only=True)
class LibvirtTarget(GuestTarget):
    type_name = "libvirt"
    help = "a libvirt domain"
    description = ("Snapshot a libvirt domain's memory (the guest pauses while it is read). "
                   "Needs access to the libvirt socket.")

    domain: str
    uri: str = DEFAULT_LIBVIRT_URI

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("domain", metavar="DOMAIN")
        parser.add_argument("--connect", metavar="URI", default=DEFAULT_LIBVIRT_URI,
                            help=f"libvirt URI (default {DEFAULT_LIBVIRT_URI})")
        cls.add_guest_arguments(parser)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LibvirtTarget:
        return cls(key=args.domain, label=f"domain {args.domain}", domain=args.domain,
                   uri=args.connect, spool=args.spool, dump_format=args.qemu_format)

    @classmethod
    def from_config(cls, name: str, c: Checker) -> LibvirtTarget:
        domain = c.string("domain", name) or name
        return cls(key=name, label=f"{name} (domain {domain})", domain=domain,
                   uri=c.string("uri", DEFAULT_LIBVIRT_URI) or DEFAULT_LIBVIRT_URI,
                   **cls.guest_config(c))

    def open(self, ctx: OpenContext) -> Opened:
        mod = import_collector("libvirt", "kdumpling.collectors.libvirt")
        return Opened(mod.LibvirtCollector(self.domain, uri=self.uri, spool=self.spool_dir(ctx),
                                           dump_format=self.dump_format))


@dataclass(frozen=True, kw_only=True)
class QmpTarget(GuestTarget):
    type_name = "qmp"
    help = "a QEMU guest through its QMP socket"
    description = "Snapshot a bare QEMU guest through its QMP socket."

    socket: str

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("socket", metavar="SOCKET")
        cls.add_guest_arguments(parser)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> QmpTarget:
        base = os.path.basename(args.socket.rstrip("/")) or "qmp"
        return cls(key="qmp-" + base, label=f"qmp {args.socket}", socket=args.socket,
                   spool=args.spool, dump_format=args.qemu_format)

    @classmethod
    def from_config(cls, name: str, c: Checker) -> QmpTarget:
        sock = c.string("socket")
        if not sock:
            raise c.fail("socket", "missing; the QMP socket path of the guest")
        return cls(key=name, label=f"{name} (qmp {sock})", socket=sock, **cls.guest_config(c))

    def open(self, ctx: OpenContext) -> Opened:
        mod = import_collector("qmp", "kdumpling.collectors.qmp")
        return Opened(mod.QmpCollector(self.socket, spool=self.spool_dir(ctx),
                                       dump_format=self.dump_format))


# -- files ------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class RawTarget(Target):
    type_name = "raw"
    kind = DumpKind.KERNEL
    help = "raw physical memory images"
    description = "Turn raw physical memory images into a kernel dump."
    in_config = False

    images: tuple[str, ...]
    phys_map: tuple[Any, ...] | None = None  # the raw collector's PhysRange entries
    vmcoreinfo: str | None = None
    vmcoreinfo_at: tuple[int, int] | None = None
    arch: str = "x86_64"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("images", metavar="IMAGE", nargs="+",
                            help="raw memory image or LiME file")
        parser.add_argument("--phys-map", metavar="PHYS:SIZE[@IMAGE[+OFFSET]],...",
                            help="where the images sit in physical memory (default: image 0 "
                                 "at 0)")
        vm = parser.add_mutually_exclusive_group(required=True)
        vm.add_argument("--vmcoreinfo", metavar="FILE", help="VMCOREINFO text file")
        vm.add_argument("--vmcoreinfo-at", metavar="ADDR,SIZE",
                        help="VMCOREINFO's physical address and size inside the images")
        parser.add_argument("--arch", default="x86_64", help="architecture (default x86_64)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RawTarget:
        images = tuple(args.images)
        at = None
        if args.vmcoreinfo_at:
            try:
                addr_s, size_s = args.vmcoreinfo_at.split(",")
                at = (int(addr_s, 0), int(size_s, 0))
            except ValueError:
                raise UsageError(
                    f"--vmcoreinfo-at wants ADDR,SIZE, got {args.vmcoreinfo_at!r}") from None
        phys_map = None
        if args.phys_map:  # a bad map is a usage error before anything is created
            mod = import_collector("raw", "kdumpling.collectors.raw")
            phys_map = tuple(mod.parse_phys_map(args.phys_map))
        base = os.path.basename(images[0]) or "raw"
        return cls(key="raw-" + base, label=f"raw {', '.join(images)}", images=images,
                   phys_map=phys_map, vmcoreinfo=args.vmcoreinfo, vmcoreinfo_at=at,
                   arch=args.arch)

    def open(self, ctx: OpenContext) -> Opened:
        mod = import_collector("raw", "kdumpling.collectors.raw")
        phys_map = list(self.phys_map) if self.phys_map is not None else None
        return Opened(mod.RawMemoryCollector(list(self.images), phys_map=phys_map,
                                             vmcoreinfo=self.vmcoreinfo,
                                             vmcoreinfo_at=self.vmcoreinfo_at, arch=self.arch))


@dataclass(frozen=True, kw_only=True)
class ConvertTarget(Target):
    """An existing dump file, written again (``convert IN OUT``)."""

    type_name = "convert"
    kind = None  # a converted file can hold a process or a kernel
    help = "rewrite a dump in another format or codec"
    description = ("Read any dump our reader opens (ELF, kdump, flattened kdump) and write it "
                   "again: OUT is a file, a directory, or - for the flattened stream on stdout. "
                   "Memory the input promises but does not hold (cut short, descriptors past "
                   "its end) is named in the warning and in --json 'missing', the output is "
                   "marked incomplete and the exit code is 65, as verify gives for it.")
    in_config = False

    path: str

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("input", metavar="IN")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ConvertTarget:
        path = os.path.abspath(args.input)
        base = os.path.basename(path).split(".")[0] or "dump"
        return cls(key=slug(base), label=f"dump {args.input}", path=path)

    def open(self, ctx: OpenContext) -> Opened:
        mod = import_collector("convert", "kdumpling.collectors.convert")
        return Opened(mod.DumpFileCollector(self.path))


TARGET_TYPES: dict[str, type[Target]] = {
    cls.type_name: cls
    for cls in (ProcessTarget, LibvirtTarget, QmpTarget, RawTarget, ConvertTarget)
}
CONFIG_TYPES = tuple(name for name, cls in TARGET_TYPES.items() if cls.in_config)
CAPTURE_TYPES = tuple(name for name in TARGET_TYPES if name != "convert")

Opener = Callable[[Target, OpenContext], Opened]


def open_target(target: Target, ctx: OpenContext) -> Opened:
    return target.open(ctx)


__all__ = [
    "CAPTURE_TYPES",
    "CONFIG_TYPES",
    "TARGET_TYPES",
    "ConvertTarget",
    "FeatureUnavailableError",
    "GuestTarget",
    "LibvirtTarget",
    "OpenContext",
    "Opened",
    "Opener",
    "ProcessTarget",
    "QmpTarget",
    "RawTarget",
    "Target",
    "import_collector",
    "open_target",
]
