"""The agent's config, schedules and target types, without live processes.

Calendar expressions are checked against ``systemd-analyze calendar`` (the reference
implementation) rather than against expected strings of our own.
"""

from __future__ import annotations

import os
import re
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
from kdumpling import CompressionType
from kdumpling.agent.calendar import parse_calendar
from kdumpling.agent.config import load_config, parse_config
from kdumpling.agent.targets import GuestTarget, LibvirtTarget, OpenContext
from kdumpling.agent.units import parse_duration, parse_size, parse_size_limit
from kdumpling.errors import ConfigError

CALENDARS = ["daily", "hourly", "minutely", "weekly", "monthly", "quarterly", "yearly",
             "Mon..Fri 09:30", "Sat,Sun 12:00", "*:0/15", "*-*-01 00:00:00", "*-02-29 03:00",
             "Tue *-*-1..7 4:00", "*:*:0/7", "*-*-* 03:00:00", "2030-01-01", "Wed,Fri 17:45:10"]


def _systemd_next(expr: str) -> datetime | None:
    out = subprocess.run(["systemd-analyze", "calendar", expr], capture_output=True, text=True,
                         env={**os.environ, "TZ": "UTC"}, timeout=30, check=True).stdout
    m = re.search(r"Next elapse: (?:\w+ )?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", out)
    if m is None:
        assert "never" in out, out
        return None
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")


@pytest.mark.parametrize("expr", ["*-*-~1", "Mon..Funday", "25:00", "*-13-01", "1:2:3.5"])
def test_calendar_refuses_what_it_cannot_read(expr: str) -> None:
    with pytest.raises(ValueError):
        parse_calendar(expr)


def test_durations_and_sizes() -> None:
    assert parse_duration("1h 30min") == parse_duration("90min") == 5400
    assert parse_duration("500ms") == pytest.approx(0.5)
    assert parse_duration(15) == 15
    assert parse_size("1.5G") == 3 << 29 and parse_size("512M") == 512 << 20
    assert parse_size_limit("15%").resolve(1000) == 150
    assert parse_size_limit("2K").resolve(10) == 2048
    for bad in ("5 parsecs", "-1s", ""):
        with pytest.raises(ValueError):
            parse_duration(bad)
    with pytest.raises(ValueError):
        parse_size_limit("150%")


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_dropins_merge_in_lexical_order(tmp_path: Path) -> None:
    main = _write(tmp_path / "agent.toml",
                  '[output]\ndirectory = "/srv/dumps"\ncompression = "zlib"\n'
                  '[targets.web]\ntype = "process"\nprocess = "nginx"\ninterval = "15min"\n')
    _write(tmp_path / "agent.toml.d" / "20-later.toml", '[output]\ncompression = "zstd"\n')
    _write(tmp_path / "agent.toml.d" / "10-first.toml",
           '[output]\ncompression = "lzo"\n[targets.web]\nkeep = 3\n'
           '[targets.vm]\ntype = "libvirt"\ncalendar = "hourly"\n')
    _write(tmp_path / "agent.toml.d" / "ignored.conf", "this is not read")
    cfg = load_config(str(main))
    assert cfg.output.directory == "/srv/dumps"
    assert cfg.output.options.compression is CompressionType.ZSTD
    assert [Path(f).name for f in cfg.files] == ["agent.toml", "10-first.toml", "20-later.toml"]
    targets = {t.name: t for t in cfg.targets}
    assert targets["web"].keep == 3 and targets["web"].schedule.interval == 900
    vm = targets["vm"].target
    assert isinstance(vm, LibvirtTarget) and vm.domain == "vm"  # defaults to the target's name
    # an error names the file that holds it, the dotted key and the reason
    _write(tmp_path / "agent.toml.d" / "30-bad.toml", '[retention]\nkep = 3\n')
    with pytest.raises(ConfigError, match=r"30-bad\.toml: retention\.kep: unknown key"):
        load_config(str(main))


@pytest.mark.parametrize(("toml", "key"), [
    ('[targets.a]\ntype = "process"\npid = 1\n', "targets.a.interval"),
    ('[targets.a]\ntype = "process"\npid = 1\nprocess = "x"\ninterval = "1s"\n', "targets.a."),
    ('[targets.a]\ntype = "process"\npid = 1\ninterval = "1s"\ncalendar = "daily"\n',
     "targets.a.interval"),
    ('[targets.a]\ntype = "qmp"\ninterval = "1s"\n', "targets.a.socket"),
    ('[targets.a]\ntype = "qmp"\nsocket = "/s"\ninterval = "1s"\nqemu_format = "kdump-lzo"\n',
     "targets.a.qemu_format"),
    ('[targets.a]\ntype = "libvirt"\ninterval = "1s"\nspool = "yes"\n', "targets.a.spool"),
    ('[targets.a]\ntype = "vmware"\ninterval = "1s"\n', "targets.a.type"),
    ('[targets.a]\ntype = "process"\npid = 1\ncalendar = "*-*-~1"\n', "targets.a.calendar"),
    ('[output]\nformat = "zip"\n', "output.format"),
    ('[output]\ndirectory = "relative/path"\n', "output.directory"),
    ('[retention]\nmax_use = "lots"\n', "retention.max_use"),
    ('[output]\ndump_level = 32\n', "output.dump_level"),
    ('[targets.a]\ntype = "process"\npid_file = "x.pid"\ninterval = "1s"\n',
     "targets.a.pid_file"),
    ("[logging]\nlevel = 1\n", "logging"),
])
def test_invalid_config_names_the_key(tmp_path: Path, toml: str, key: str) -> None:
    path = _write(tmp_path / "agent.toml", toml)
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert f"{path}: {key}" in str(err.value)
    assert err.value.exit_code == 78


def test_guest_spool_and_qemu_format(tmp_path: Path) -> None:
    path = _write(tmp_path / "agent.toml",
                  '[targets.a]\ntype = "qmp"\nsocket = "/s"\ninterval = "1h"\n'
                  '[targets.b]\ntype = "libvirt"\ninterval = "1h"\nqemu_format = "kdump-zlib"\n'
                  '[targets.c]\ntype = "libvirt"\ninterval = "1h"\nspool = true\n')
    t = {x.name: x.target for x in load_config(str(path)).targets}
    assert all(isinstance(g, GuestTarget) for g in t.values())
    ctx = OpenContext(spool_dir="/store")
    a, b, c = (t[n] for n in "abc")
    assert isinstance(a, GuestTarget) and a.spool_dir(ctx) is None
    assert isinstance(b, GuestTarget)  # kdump-zlib implies the spool
    assert b.spool_dir(ctx) == "/store" and b.dump_format == "kdump-zlib"
    assert isinstance(c, GuestTarget) and c.spool_dir(ctx) == "/store"


def test_defaults_like_coredump_conf() -> None:
    cfg = parse_config({})
    assert cfg.targets == () and cfg.output.options.format is None  # auto
    assert cfg.retention.max_use is not None and cfg.retention.max_use.percent == 10
    assert cfg.retention.keep_free is not None and cfg.retention.keep_free.percent == 15
    off = parse_config({"retention": {"max_use": 0, "keep_free": "0"}})
    assert off.retention.max_use is None and off.retention.keep_free is None


def test_example_config_loads() -> None:
    example = Path(__file__).resolve().parent.parent / "systemd" / "agent.toml.example"
    cfg = load_config(str(example))
    assert {t.type for t in cfg.targets} >= {"process", "libvirt"}


def test_one_registry_for_config_cli_and_service(tmp_path: Path) -> None:
    """Every target type of the config is a ``capture`` subcommand too, from the same class."""
    import argparse

    from kdumpling.agent.cli import build_parser
    from kdumpling.agent.targets import CAPTURE_TYPES, CONFIG_TYPES, TARGET_TYPES

    assert set(CONFIG_TYPES) == {"process", "libvirt", "qmp"}
    assert set(CONFIG_TYPES) <= set(CAPTURE_TYPES) and "convert" in TARGET_TYPES
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    capture = sub.choices["capture"]
    kinds = next(a for a in capture._actions if isinstance(a, argparse._SubParsersAction))
    assert set(kinds.choices) == set(CAPTURE_TYPES)
    for name in CAPTURE_TYPES:
        assert kinds.choices[name].description == TARGET_TYPES[name].description
    path = _write(tmp_path / "agent.toml",
                  '[targets.p]\ntype = "process"\npid_file = "/run/x.pid"\ninterval = "1h"\n'
                  '[targets.q]\ntype = "qmp"\nsocket = "/s"\ninterval = "1h"\n')
    for t in load_config(str(path)).targets:
        assert isinstance(t.target, TARGET_TYPES[t.type]) and t.target.key == t.name
    # raw images and dump files are command-line targets only
    bad = _write(tmp_path / "raw.toml", '[targets.r]\ntype = "raw"\ninterval = "1h"\n')
    with pytest.raises(ConfigError, match=r"targets\.r\.type: must be one of"):
        load_config(str(bad))


def test_opening_a_process_target_leaves_it_unchanged() -> None:
    """What opening found (the PID a name meant, the executable) comes back beside the target."""
    import dataclasses

    from kdumpling.agent.targets import ProcessTarget

    with subprocess.Popen(["sleep", "60"]) as sleeper:
        try:
            target = ProcessTarget(key="s", label="s", pid_file=None, pid=sleeper.pid)
            before = dataclasses.asdict(target)
            opened = target.open(OpenContext(spool_dir="/nowhere"))  # not entered: no ptrace
            assert opened.pid == sleeper.pid
            assert opened.exe == os.readlink(f"/proc/{sleeper.pid}/exe")
            assert dataclasses.asdict(target) == before
        finally:
            sleeper.kill()
    with pytest.raises(dataclasses.FrozenInstanceError):
        target.pid = 1  # type: ignore[misc]
