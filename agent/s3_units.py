"""The systemd drop-in that lets the service reach an S3 endpoint (issue 15).

The shipped units have no network (PrivateNetwork=yes, IPAddressDeny=any, AF_UNIX only); for
``[output] directory = "s3://..."`` the service needs TCP. ``service install`` calls
``sync_dropins``: with an s3:// output it writes systemd/s3-network.conf as
``UNIT.d/50-kdumpling-s3-network.conf`` next to each service unit, otherwise it removes a drop-in
left from before; ``service uninstall`` calls ``remove_dropins``.
"""

from __future__ import annotations

import contextlib
import os
from importlib.resources import files

from kdumpling.errors import ConfigError

from .config import load_config

TEMPLATE = "s3-network.conf"
DROPIN = "50-kdumpling-s3-network.conf"


def wants_network(config_path: str) -> bool:
    """True when the config sends snapshots to an s3:// URL."""
    try:
        directory = load_config(config_path).output.directory
    except ConfigError:
        return False
    return bool(directory) and str(directory).startswith("s3://")


def dropin_paths(unit_dir: str, units: tuple[str, ...]) -> list[str]:
    return [os.path.join(unit_dir, unit + ".d", DROPIN) for unit in units
            if unit.endswith(".service")]


def sync_dropins(unit_dir: str, units: tuple[str, ...], config_path: str) -> list[str]:
    """Write (s3:// output) or remove (otherwise) the drop-ins; the paths written."""
    if not wants_network(config_path):
        remove_dropins(unit_dir, units)
        return []
    text = files("kdumpling.systemd").joinpath(TEMPLATE).read_text(encoding="utf-8")
    written = []
    for path in dropin_paths(unit_dir, units):
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        written.append(path)
    return written


def remove_dropins(unit_dir: str, units: tuple[str, ...]) -> list[str]:
    """Remove the drop-ins (and their UNIT.d directories when empty); the paths removed."""
    removed = []
    for path in dropin_paths(unit_dir, units):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed.append(path)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(path))
    return removed
