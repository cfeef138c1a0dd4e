"""``service install`` / ``service uninstall``: the shipped units, pointed at this installation.

The unit templates and the example config are package data (``kdumpling.systemd``, the checkout's
``systemd/`` folder), so an installed wheel carries them. Installing writes the three units into
``ROOT/etc/systemd/system`` with ``ExecStart=`` naming this installation's own console script (a
venv in /opt as well as /usr/bin), adds ``ReadWritePaths=`` for what the config asks the service to
write outside ``StateDirectory=`` (the metrics textfile, another snapshot directory), and puts the
example config in place only when there is none. ``systemctl`` talks to the running manager only
when systemd is PID 1 (sd_booted(3): ``/run/systemd/system`` exists) and ROOT is ``/``; otherwise
enabling works offline with ``systemctl --root`` (symlinks only) and starting is left to the user.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

from kdumpling.errors import ConfigError, KdumplingError, PermissionDeniedError

from .config import load_config
from .s3_units import remove_dropins, sync_dropins

SERVICE = "kdumpling-agent.service"
ONCE_SERVICE = "kdumpling-agent-once.service"
TIMER = "kdumpling-agent-once.timer"
UNITS = (SERVICE, ONCE_SERVICE, TIMER)
EXAMPLE = "agent.toml.example"
UNIT_DIR = "etc/systemd/system"
CONFIG = "etc/kdumpling/agent.toml"
TEMPLATE_EXEC = "/usr/bin/kdumpling-agent"  # what the shipped units say; replaced on install
STATE_DIR = "/var/lib/kdumpling"  # the units' StateDirectory=, writable without ReadWritePaths=
# Debian's prometheus-node-exporter reads its textfile collector from here; the templates
# already name it (optional "-" path), so only other directories need a line of their own.
NODE_EXPORTER_DIR = "/var/lib/prometheus/node-exporter"
# Directories PrivateTmp=yes hides from the service: an ExecStart there cannot run.
PRIVATE_TMP_DIRS = ("/tmp", "/var/tmp")


class SystemctlError(KdumplingError):
    """systemctl refused a request (daemon-reload, enable, start, stop, disable)."""

    exit_code = 69  # EX_UNAVAILABLE


@dataclass
class Report:
    """What install or uninstall did, for the one-line-per-step output and --json."""

    action: str
    root: str
    exec_start: str | None = None
    units: list[str] = field(default_factory=list)
    config: str | None = None
    config_created: bool = False
    read_write_paths: list[str] = field(default_factory=list)
    systemctl: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def lines(self) -> list[str]:
        verb = "wrote" if self.action == "install" else "removed"
        out = [f"{verb} {u}" for u in self.units]
        if self.exec_start:
            out.append(f"ExecStart={self.exec_start} service")
        out += [f"ReadWritePaths=-{p}" for p in self.read_write_paths]
        if self.config:
            made = self.action == "install" and self.config_created
            out.append(f"{'wrote the example config' if made else 'kept'} {self.config}")
        out += ["ran " + " ".join(cmd) for cmd in self.systemctl]
        out += self.notes
        return out


def template(name: str) -> str:
    """A unit template or the example config, from the installed package."""
    return files("kdumpling.systemd").joinpath(name).read_text(encoding="utf-8")


def systemd_escape_arg(arg: str) -> str:
    """One ExecStart= word: quoted when needed, with systemd's specifier and variable escapes."""
    text = arg.replace("%", "%%").replace("$", "$$")  # systemd.unit(5) specifiers, $VAR
    if any(c.isspace() or c in "\"'\\;" for c in text):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def agent_command() -> list[str]:
    """This installation's kdumpling-agent: the running script, else the one next to Python."""
    candidates = []
    if os.path.basename(sys.argv[0]) == "kdumpling-agent":
        candidates.append(os.path.abspath(sys.argv[0]))
    candidates.append(os.path.join(os.path.dirname(os.path.abspath(sys.executable)),
                                   "kdumpling-agent"))
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return [path]
    # ``python -m kdumpling.agent.cli`` without the console script: the interpreter itself.
    return [os.path.abspath(sys.executable), "-m", "kdumpling.agent.cli"]


def render_unit(text: str, command: list[str], read_write: list[str]) -> str:
    """The template with ExecStart= pointed at ``command`` and extra ReadWritePaths= lines."""
    exec_prefix = f"ExecStart={TEMPLATE_EXEC}"
    exec_start = "ExecStart=" + " ".join(systemd_escape_arg(a) for a in command)
    out = ["# Written by 'kdumpling-agent service install'; 'service uninstall' removes it.",
           "# Local changes belong in a drop-in: systemctl edit UNIT."]
    for line in text.splitlines():
        if line.startswith(exec_prefix):
            line = exec_start + line[len(exec_prefix):]
        out.append(line)
        if line.startswith("ReadWritePaths="):
            out += [f"ReadWritePaths=-{systemd_escape_arg(p)}" for p in read_write]
    return "\n".join(out) + "\n"


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def extra_read_write_paths(config_path: str) -> tuple[list[str], list[str]]:
    """Directories the configured service writes outside StateDirectory=; and notes."""
    try:
        config = load_config(config_path)
    except ConfigError as err:
        return [], [f"warning: {err} (no ReadWritePaths= taken from it)"]
    wanted: list[str] = []
    if config.output.directory and not config.output.directory.startswith("s3://") \
            and not _within(config.output.directory, STATE_DIR):
        wanted.append(config.output.directory)
    textfile = config.metrics.textfile
    if textfile is not None:
        directory = os.path.dirname(textfile)
        if not _within(directory, NODE_EXPORTER_DIR) and not _within(directory, STATE_DIR):
            wanted.append(directory)
    return sorted(set(wanted)), []


def _write_atomic(path: str, text: str, mode: int) -> None:
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".kdumpling-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def systemd_running() -> bool:
    """sd_booted(3): systemd is this system's init."""
    return os.path.isdir("/run/systemd/system")


def _systemctl(report: Report, *args: str) -> None:
    tool = shutil.which("systemctl") or "systemctl"
    cmd = ["systemctl", *args]
    try:
        res = subprocess.run([tool, *args], capture_output=True, text=True, timeout=300,
                             check=False)
    except OSError as err:
        raise SystemctlError(f"{' '.join(cmd)}: {err.strerror}") from None
    report.systemctl.append(cmd)
    if res.returncode != 0:
        why = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
        raise SystemctlError(f"{' '.join(cmd)} failed: {why}")


def _root(root: str) -> tuple[str, bool]:
    path = os.path.realpath(root)
    return path, path == "/" and systemd_running()


def install(root: str = "/", *, enable: bool = False, now: bool = False,
            timer: bool = False) -> Report:
    """Write the units (and the example config when there is none); enable/start on request."""
    root, live = _root(root)
    report = Report("install", root)
    command = agent_command()
    report.exec_start = " ".join(systemd_escape_arg(a) for a in command)
    if any(_within(command[0], d) for d in PRIVATE_TMP_DIRS):
        report.notes.append(f"warning: {command[0]} is under a directory PrivateTmp=yes hides "
                            "from the service; install kdumpling elsewhere (e.g. a venv in /opt)")
    config = os.path.join(root, CONFIG)
    report.config = config
    try:
        if not os.path.lexists(config):
            _write_atomic(config, template(EXAMPLE), 0o644)
            report.config_created = True
        report.read_write_paths, notes = extra_read_write_paths(config)
        report.notes += notes
        for name in UNITS:
            path = os.path.join(root, UNIT_DIR, name)
            _write_atomic(path, render_unit(template(name), command, report.read_write_paths),
                          0o644)
            report.units.append(path)
        # s3:// output: the drop-in that opens the network (agent/s3_units.py)
        report.units += sync_dropins(os.path.join(root, UNIT_DIR), UNITS, config)
    except PermissionError as err:
        raise PermissionDeniedError(f"cannot write {err.filename}: permission denied "
                                    "(run as root)") from None
    unit = TIMER if timer else SERVICE
    if live:
        _systemctl(report, "daemon-reload")
        if enable:
            _systemctl(report, "enable", unit)
        if now:  # restart: a running service picks up the new unit file
            _systemctl(report, "restart", unit)
    else:
        if enable:
            _systemctl(report, f"--root={root}", "enable", unit)
        why = "systemd is not running" if root == "/" else f"{root} is not this system's root"
        report.notes.append(f"{why}: did not run systemctl daemon-reload"
                            + (f" or start {unit}" if now else ""))
    if not enable and not now:
        report.notes.append(f"next: edit {config}, then systemctl enable --now "
                            f"{SERVICE.removesuffix('.service')} (or {TIMER})")
    return report


def uninstall(root: str = "/") -> Report:
    """Stop, disable and remove the units; the config and the snapshots stay."""
    root, live = _root(root)
    report = Report("uninstall", root)
    present = [u for u in UNITS if os.path.lexists(os.path.join(root, UNIT_DIR, u))]
    if present:
        if live:
            _systemctl(report, "disable", "--now", *present)
        else:
            _systemctl(report, f"--root={root}", "disable", *present)
    try:
        report.units += remove_dropins(os.path.join(root, UNIT_DIR), UNITS)
        for name in present:
            path = os.path.join(root, UNIT_DIR, name)
            os.unlink(path)
            report.units.append(path)
    except PermissionError as err:
        raise PermissionDeniedError(f"cannot remove {err.filename}: permission denied "
                                    "(run as root)") from None
    if live and present:
        _systemctl(report, "daemon-reload")
    config = os.path.join(root, CONFIG)
    if os.path.lexists(config):
        report.config = config
    if not present:
        report.notes.append(f"no kdumpling units in {os.path.join(root, UNIT_DIR)}")
    return report


__all__ = ["SystemctlError", "agent_command", "install", "render_unit", "uninstall"]
