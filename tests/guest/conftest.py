"""Session fixtures: one real Linux guest under QEMU (and one under libvirt), booted once.

The kernel comes from Debian's archive into ``$KDUMPLING_TEST_CACHE`` (default
/var/cache/kdumpling-tests) and is reused across runs; the initramfs, QEMU's sockets and
the guest's RAM file live in a private directory removed at the end. A missing tool skips the
tests that need it (a failure under KDUMPLING_REQUIRE_ALL=1). ``KDUMPLING_TEST_DEBUGINFO=1``
also fetches the kernel's vmlinux (an 858 MB download) for the crash-with-vmlinux test.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from tests import tiers

from . import rig
from .checks import Expect


def _missing(what: str) -> NoReturn:
    tiers.missing("guest", what)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    del config
    tiers.mark_folder(items, str(Path(__file__).parent), pytest.mark.guest, pytest.mark.slow)


@pytest.fixture(scope="session")
def guest_kernel() -> rig.KernelFiles:
    lacking = [t for t in ("qemu-system-x86_64", "apt-get", "dpkg-deb", "crash", "makedumpfile")
               if shutil.which(t) is None]
    if lacking:
        _missing(f"guest tests need {', '.join(lacking)}")
    try:
        rig.find_busybox()
        return rig.prepare_kernel()
    except rig.RigError as err:
        _missing(f"no guest kernel: {err}")


@pytest.fixture(scope="session")
def guest_dir() -> Iterator[Path]:
    # Short path under /tmp: QMP's unix socket path must fit in sun_path (108 bytes).
    path = Path(tempfile.mkdtemp(prefix="kdt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def guest_spec() -> rig.GuestSpec:
    return rig.new_spec()


@pytest.fixture(scope="session")
def guest_initramfs(guest_kernel: rig.KernelFiles, guest_dir: Path,
                    guest_spec: rig.GuestSpec) -> Path:
    return rig.build_initramfs(guest_kernel, guest_dir / "initramfs.cpio.gz", guest_spec)


@pytest.fixture(scope="session")
def qemu_guest(guest_kernel: rig.KernelFiles, guest_initramfs: Path, guest_dir: Path,
               guest_spec: rig.GuestSpec) -> Iterator[rig.QemuGuest]:
    """The guest, its RAM in a shared file (the raw collector reads it), QMP on a socket."""
    shm = Path("/dev/shm")
    ram_dir = shm if shm.is_dir() and os.access(shm, os.W_OK) else guest_dir
    guest = rig.QemuGuest(guest_kernel, guest_initramfs, guest_dir / "vm", guest_spec,
                          ram_file=ram_dir / f"kdt-{guest_spec.nonce}.ram")
    try:
        guest.start()
    except rig.RigError as err:
        guest.stop()
        pytest.fail(f"guest did not boot: {err}")
    try:
        yield guest
    finally:
        guest.stop()


@pytest.fixture(scope="session")
def qemu_expect(qemu_guest: rig.QemuGuest, guest_spec: rig.GuestSpec) -> Expect:
    assert qemu_guest.report is not None
    return Expect(guest_spec, qemu_guest.report)


@pytest.fixture(scope="session")
def negative_phys_base_guest(guest_kernel: rig.KernelFiles,
                             guest_dir: Path) -> Iterator[rig.QemuGuest]:
    """A stopped guest whose KASLR phys_base is negative on every boot (a replay seed under
    TCG -icount; see rig.replay_options), so QEMU's dumps of it always carry one."""
    spec = rig.new_spec("0e9a71fe5eed0b5e")  # fixed: the initramfs bytes feed KASLR's seed
    initramfs = rig.build_initramfs(guest_kernel, guest_dir / "replay-initramfs.cpio.gz", spec)
    try:
        guest = rig.boot_negative_phys_base(guest_kernel, initramfs, guest_dir / "replay", spec)
    except rig.RigError as err:
        pytest.fail(f"no guest with a negative phys_base: {err}")
    try:
        yield guest
    finally:
        guest.stop()


@pytest.fixture(scope="session")
def libvirt_daemons(guest_dir: Path) -> Iterator[rig.LibvirtDaemons]:
    tiers.module("libvirt", "libvirt", "pip install libvirt-python")
    daemons = rig.LibvirtDaemons(guest_dir / "libvirt")
    try:
        daemons.start()
    except rig.RigError as err:
        daemons.stop()
        _missing(f"no libvirt daemon: {err}")
    yield daemons
    daemons.stop()


@pytest.fixture(scope="session")
def libvirt_guest(libvirt_daemons: rig.LibvirtDaemons, guest_kernel: rig.KernelFiles,
                  guest_initramfs: Path, guest_dir: Path,
                  guest_spec: rig.GuestSpec) -> Iterator[rig.LibvirtGuest]:
    guest = rig.LibvirtGuest(guest_kernel, guest_initramfs, guest_dir / "lv", guest_spec)
    try:
        guest.start()
    except rig.RigError as err:
        guest.stop()
        pytest.fail(f"libvirt guest did not boot: {err}")
    try:
        yield guest
    finally:
        guest.stop()


@pytest.fixture(scope="session")
def libvirt_expect(libvirt_guest: rig.LibvirtGuest, guest_spec: rig.GuestSpec) -> Expect:
    assert libvirt_guest.report is not None
    return Expect(guest_spec, libvirt_guest.report)


@pytest.fixture(scope="session")
def guest_vmlinux(guest_kernel: rig.KernelFiles) -> Path:
    if os.environ.get("KDUMPLING_TEST_DEBUGINFO") != "1":
        # Opt-in, not a missing tool: the download is 858 MB, so REQUIRE_ALL accepts the skip.
        tiers.not_applicable("set KDUMPLING_TEST_DEBUGINFO=1 to fetch the kernel's vmlinux "
                             "(858 MB)")
    try:
        return rig.prepare_debuginfo(guest_kernel)
    except rig.RigError as err:
        _missing(f"no debug vmlinux: {err}")


@pytest.fixture
def out_dir(guest_dir: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """Per-test output directory, removed afterwards (guest dumps are hundreds of MB)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in request.node.name)[:80]
    path = guest_dir / "out" / safe
    path.mkdir(parents=True, exist_ok=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)
