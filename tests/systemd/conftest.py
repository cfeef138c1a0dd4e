"""The ``systemd`` tier: a real systemd 252 as PID 1 of a throw-away container over the host's own
root file system (../shared/docs/systemd-container.md has the measurements).

The container is ``systemd-nspawn --volatile=overlay`` on a non-recursive bind mount of ``/``, in a
private mount namespace (``unshare``), with its own cgroup, a private network and the host image's
own daemons masked; every write inside lands in a tmpfs upper layer, so installing units, venvs
and snapshots leaves the host untouched. The fixture is module-scoped (one boot per test file) and
its teardown powers the container off, kills what is left, and removes the cgroups it made; the
mounts die with the namespace. Without root or systemd-nspawn the tier skips, and fails under
KDUMPLING_REQUIRE_ALL=1.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from tests import tiers

REPO = Path(__file__).resolve().parents[2]
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# Where the tests' own venv (sys.prefix) is bound, read-only, inside the container.
TEST_VENV = "/opt/kdumpling-test-venv"
CGROUP = Path("/sys/fs/cgroup")
# Units of the host image that would start inside the container too (databases, libvirt, the
# daily timers); masked on the container's kernel command line.
MASKED = (
    "postgresql.service", "libvirtd.service", "libvirt-guests.service", "virtlockd.service",
    "virtlogd.service", "libvirtd.socket", "libvirtd-ro.socket", "libvirtd-admin.socket",
    "virtlockd.socket", "virtlockd-admin.socket", "virtlogd.socket", "virtlogd-admin.socket",
    "systemd-timesyncd.service", "getty@tty1.service", "apt-daily.timer",
    "apt-daily-upgrade.timer", "dpkg-db-backup.timer", "e2scrub_all.timer", "fstrim.timer",
    "logrotate.timer", "man-db.timer",
)


def _require(reason: str) -> NoReturn:
    tiers.missing("systemd", reason)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    del config
    tiers.mark_folder(items, str(Path(__file__).parent), pytest.mark.systemd)


def _cgroup_dirs(name: str) -> list[Path]:
    if (CGROUP / "cgroup.controllers").exists():  # pure cgroup v2
        return [CGROUP / name]
    # hybrid: systemd's named v1 hierarchy plus the v2 one beside it
    return [CGROUP / h / name for h in ("unified", "systemd") if (CGROUP / h).is_dir()]


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry))
    return out


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


class Container:
    """One booted container; ``run`` executes a command inside it (nsenter)."""

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.workdir = workdir
        self.root = workdir / "root"
        self.cgroups = _cgroup_dirs(name)
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1 = 0

    # -- lifecycle ----------------------------------------------------------------------------

    def boot(self, timeout: float = 60.0) -> None:
        self.root.mkdir()
        for cg in self.cgroups:
            cg.mkdir()
        nspawn = shlex.join([
            "systemd-nspawn", "--quiet", f"--directory={self.root}", "--volatile=overlay",
            "--register=no", "--keep-unit", "--private-network", "--console=read-only",
            # The test venv at a path the container (its own /tmp) and the units (PrivateTmp)
            # can see, wherever the checkout is: a clone under /tmp is common in CI.
            f"--bind-ro={sys.prefix}:{TEST_VENV}",
            "-M", self.name, "-b", "--", "systemd.unit=multi-user.target",
            *[f"systemd.mask={u}" for u in MASKED]])
        inner = (f"mount --bind / {shlex.quote(str(self.root))} && "
                 "mkdir -p /run/systemd/nspawn && mount -t tmpfs tmpfs /run/systemd/nspawn && "
                 f"exec {nspawn}")
        joins = "".join(f"echo $$ > {shlex.quote(str(cg / 'cgroup.procs'))} && "
                        for cg in self.cgroups)
        script = (f"{joins}exec unshare --mount --propagation private -- "
                  f"bash -c {shlex.quote(inner)}")
        log = open(self.workdir / "console.log", "wb")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(["bash", "-c", script], stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        end = time.monotonic() + timeout
        while not self.pid1:
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"the container did not start: {self.console()[-2000:]}")
            self.pid1 = next((c for c in _children(self.proc.pid) if _comm(c) == "systemd"), 0)
            time.sleep(0.05)
        state = ""
        while time.monotonic() < end:
            res = self.run("systemctl", "is-system-running", check=False)
            state = res.stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.1)
        raise RuntimeError(f"the container's systemd did not finish booting ({state!r})")

    def shutdown(self) -> None:
        proc = self.proc
        if proc is not None:
            if proc.poll() is None and self.pid1:
                with contextlib.suppress(Exception):
                    self.run("systemctl", "poweroff", "--no-block", check=False, timeout=10)
            for sig, wait in ((None, 15.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
                if sig is not None and proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(wait)
                if proc.poll() is not None:
                    break
        for cg in self.cgroups:
            self._remove_cgroup(cg)
        with contextlib.suppress(OSError):
            self.root.rmdir()  # an empty mount point on the host (the bind lived in the namespace)

    @staticmethod
    def _remove_cgroup(top: Path) -> None:
        for _ in range(100):
            if not top.exists():
                return
            for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)
            if top.exists():
                time.sleep(0.1)

    def console(self) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / "console.log").read_text(errors="replace")
        return ""

    # -- inside -------------------------------------------------------------------------------

    def run(self, *argv: str, check: bool = True, timeout: float = 120.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-m", "-u", "-i", "-n", "-p", "-C", "--",
             "env", "-i", f"PATH={PATH}", "LANG=C.UTF-8", *argv],
            capture_output=True, text=True, timeout=timeout, check=False, input=input)
        if check and res.returncode != 0:
            raise AssertionError(f"in the container: {shlex.join(argv)} exited "
                                 f"{res.returncode}\n{res.stdout}\n{res.stderr}")
        return res

    def sh(self, script: str, check: bool = True, timeout: float = 120.0) \
            -> subprocess.CompletedProcess[str]:
        return self.run("bash", "-c", script, check=check, timeout=timeout)

    def write(self, path: str, text: str) -> None:
        self.run("bash", "-c", f"mkdir -p \"$(dirname {shlex.quote(path)})\" && "
                               f"cat > {shlex.quote(path)}", input=text)

    def put(self, source: Path, path: str) -> None:
        """Copy a host file into the container (into its overlay, through its root)."""
        dest = Path(f"/proc/{self.pid1}/root") / path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)

    def read(self, path: str) -> str:
        return self.run("cat", path).stdout

    def show(self, unit: str, *props: str) -> dict[str, str]:
        res = self.run("systemctl", "show", unit, *[f"--property={p}" for p in props])
        return dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)

    def journal(self, unit: str) -> str:
        return self.run("journalctl", "-b", "--no-pager", "-o", "cat", "-u", unit).stdout


@pytest.fixture(scope="module")
def container() -> Iterator[Container]:
    if os.geteuid() != 0:
        _require("needs root")
    for tool in ("systemd-nspawn", "unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            _require(f"{tool} is not installed (apt install systemd-container util-linux)")
    workdir = Path(tempfile.mkdtemp(prefix="kdl-systemd-"))
    box = Container(f"kdl-test-{os.getpid()}-{secrets.token_hex(3)}", workdir)
    try:
        box.boot()  # the runtime is there: a container that does not boot is a failure
        yield box
    finally:
        box.shutdown()
        for leftover in ("console.log",):
            with contextlib.suppress(OSError):
                (workdir / leftover).unlink()
        with contextlib.suppress(OSError):
            workdir.rmdir()


def wait_until(predicate: object, timeout: float, what: str, step: float = 0.1) -> None:
    """Poll ``predicate()`` until true."""
    assert callable(predicate)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
