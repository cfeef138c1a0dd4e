"""The agent's config, schedules and store rules, without live processes.

Calendar expressions are checked against ``systemd-analyze calendar`` (the reference
implementation) rather than against expected strings of our own.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from kdumpling.agent.calendar import parse_calendar
from kdumpling.agent.config import load_config, parse_config
from kdumpling.agent.store import Store
from kdumpling.agent.units import parse_duration, parse_size, parse_size_limit
from kdumpling.errors import ConfigError

from tests.agenttools import assert_one_error_line, run_agent

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


@pytest.mark.parametrize("expr", CALENDARS)
def test_calendar_matches_systemd(expr: str) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    spec = parse_calendar(expr + " UTC")
    for _ in range(3):  # a second boundary between the two calls: ask again
        before = time.time()
        want = _systemd_next(expr)
        ours = spec.next_after(before)
        got = datetime.fromtimestamp(ours, UTC).replace(tzinfo=None) if ours else None
        if got == want or int(time.time()) == int(before):
            break
    assert got == want


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
    assert cfg.output.directory == "/srv/dumps" and cfg.output.compression == "zstd"
    assert [Path(f).name for f in cfg.files] == ["agent.toml", "10-first.toml", "20-later.toml"]
    targets = {t.name: t for t in cfg.targets}
    assert targets["web"].keep == 3 and targets["web"].schedule.interval == 900
    assert targets["vm"].params["domain"] == "vm"  # defaults to the target's name
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
    from kdumpling.agent.targets import spec_from_config

    path = _write(tmp_path / "agent.toml",
                  '[targets.a]\ntype = "qmp"\nsocket = "/s"\ninterval = "1h"\n'
                  '[targets.b]\ntype = "libvirt"\ninterval = "1h"\nqemu_format = "kdump-zlib"\n'
                  '[targets.c]\ntype = "libvirt"\ninterval = "1h"\nspool = true\n')
    t = {x.name: x for x in load_config(str(path)).targets}
    assert "spool" not in spec_from_config(t["a"], spool="/store").params
    b = spec_from_config(t["b"], spool="/store").params  # kdump-zlib implies the spool
    assert b["spool"] == "/store" and b["dump_format"] == "kdump-zlib"
    assert spec_from_config(t["c"], spool="/store").params["spool"] == "/store"


def test_defaults_like_coredump_conf() -> None:
    cfg = parse_config({})
    assert cfg.targets == () and cfg.output.format == "auto"
    assert cfg.retention.max_use is not None and cfg.retention.max_use.percent == 10
    assert cfg.retention.keep_free is not None and cfg.retention.keep_free.percent == 15
    off = parse_config({"retention": {"max_use": 0, "keep_free": "0"}})
    assert off.retention.max_use is None and off.retention.keep_free is None


def test_example_config_loads() -> None:
    example = Path(__file__).resolve().parent.parent / "systemd" / "agent.toml.example"
    cfg = load_config(str(example))
    assert {t.type for t in cfg.targets} >= {"process", "libvirt"}


def test_store_only_removes_what_it_wrote(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    res = store.reserve("web", "core", {"target": "web"})
    Path(res.path).write_bytes(b"x" * 4096)
    store.commit(res, {"bytes_out": 4096})
    (rec,) = store.records()
    assert store.status(rec) == "present"
    # replaced behind our back: same name, another file (maybe the same inode number, but a
    # later mtime): not ours to delete
    time.sleep(0.05)
    os.unlink(res.path)
    Path(res.path).write_bytes(b"y" * 4096)
    assert store.status(rec) == "modified"
    store.remove(rec)
    assert Path(res.path).read_bytes() == b"y" * 4096
    assert store.records() == []
    # a JSON file that is not one of our records is ignored, and never touched
    other = tmp_path / "s" / "notes.json"
    other.write_text(json.dumps({"id": "notes"}))
    assert store.records() == [] and other.exists()
    store.close()


def test_store_abandoned_capture_is_cleaned(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    res = store.reserve("web", "core", {})
    # a capture killed with SIGKILL leaves its .incomplete and a "capturing" record whose
    # process is gone
    Path(res.path + ".incomplete").write_bytes(b"partial")
    data = json.loads((tmp_path / "s" / res.sidecar).read_text())
    data["agent_pid"] = 4194000
    (tmp_path / "s" / res.sidecar).write_text(json.dumps(data))
    (rec,) = store.records()
    assert store.status(rec) == "abandoned"
    store.close()
    proc = run_agent(["prune", "-D", str(tmp_path / "s"), "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["cleaned"] == [res.id]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == []


def test_a_running_capture_of_the_same_target_is_not_overlapped(tmp_path: Path) -> None:
    store_dir = tmp_path / "s"
    store = Store(str(store_dir))
    with store.lock_target("sleep") as got:
        assert got
        # the second taker of the same lock, in another process, is the CLI
        with subprocess.Popen(["sleep", "60"]) as sleeper:
            try:
                proc = run_agent(["capture", "process", str(sleeper.pid), "-o", f"{store_dir}/"],
                                 tmp_path)
            finally:
                sleeper.kill()
        assert proc.returncode == 75
        assert "already running" in assert_one_error_line(proc)
        lock = store_dir / ".locks" / "sleep.lock"
        with open(lock) as f, pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    store.close()
