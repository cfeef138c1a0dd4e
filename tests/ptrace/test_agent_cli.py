"""kdumpling-agent through its real entry point (a subprocess): captures of a live fixture
process, the --json schema, every exit-code class, list/info/verify/prune/debug on real
snapshots, disk full and retention on small tmpfs mounts, and SIGTERM in the middle of a capture.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests import tiers
from tests.agenttools import (
    Fixture,
    agent_argv,
    assert_one_error_line,
    clean_env,
    count_pattern_pages,
    fixture_process,
    json_out,
    run_agent,
    tmpfs,
    wait_for,
)

NOBODY = 65534


@pytest.fixture
def fx() -> Fixture:
    with fixture_process(mb=4) as f:
        yield f


def _capture(tmp: Path, pid: int, store: Path, *extra: str) -> dict[str, object]:
    proc = run_agent(["capture", "process", str(pid), "-o", f"{store}/", "--json", *extra], tmp)
    assert proc.returncode == 0, proc.stderr
    result = json_out(proc)
    assert isinstance(result, dict)
    return result


def test_capture_process_json_schema(tmp_path: Path, fx: Fixture) -> None:
    store = tmp_path / "store"
    r = _capture(tmp_path, fx.pid, store, "--annotate", "ticket=KDL-5", "--annotate", "who=test")
    types = {"id": str, "path": str, "target": str, "target_key": str, "kind": str,
             "format": str, "codec": str, "bytes_in": int, "bytes_out": int, "sha256": str,
             "pause_seconds": float, "total_seconds": float, "write_seconds": float,
             "warnings": list, "unreadable": list, "truncated": bool, "annotations": dict,
             "time": str, "pruned": list, "exit_code": int, "pid": int, "exe": str}
    for key, typ in types.items():
        assert isinstance(r[key], typ), (key, r.get(key))
    assert r["kind"] == "process" and r["format"] == "elf" and r["codec"] == "none"
    assert r["pid"] == fx.pid and r["exit_code"] == 0
    assert r["annotations"]["ticket"] == "KDL-5" and r["annotations"]["who"] == "test"
    assert r["pause_seconds"] >= 0 and r["total_seconds"] >= r["write_seconds"]
    path = Path(str(r["path"]))
    assert path.parent == store
    # 0600 file in a 0700 directory, sha256 and size as recorded, sidecar beside it
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    assert hashlib.sha256(path.read_bytes()).hexdigest() == r["sha256"]
    assert path.stat().st_size == r["bytes_out"]
    sidecar = json.loads((store / f"{r['id']}.json").read_text())
    assert sidecar["sha256"] == r["sha256"] and sidecar["state"] == "complete"
    assert stat.S_IMODE((store / f"{r['id']}.json").stat().st_mode) == 0o600
    assert not list(store.glob("*.incomplete")) and not list(store.glob("*.tmp"))
    # the fixture's memory is in the core, its annotations are in the dump, and it runs on
    assert count_pattern_pages(path, fx.pattern_page) >= fx.mb * 256
    from kdumpling.reader import open_dump
    with open_dump(path) as d:
        assert d.annotations["ticket"] == "KDL-5"
    fx.assert_untouched()


def test_capture_to_file_and_to_stdout(tmp_path: Path, fx: Fixture) -> None:
    out = tmp_path / "one.core"
    proc = run_agent(["capture", "process", str(fx.pid), "-o", str(out), "-q"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and out.exists() and not list(tmp_path.glob("*.json"))
    # an existing file is not replaced without --force
    again = run_agent(["capture", "process", str(fx.pid), "-o", str(out)], tmp_path)
    assert again.returncode == 2
    assert "--force" in assert_one_error_line(again)
    # "-o -": the dump is the only thing on stdout
    streamed = tmp_path / "streamed.core"
    with open(streamed, "wb") as f:
        proc = run_agent(["capture", "process", str(fx.pid), "-o", "-"], tmp_path, stdout=f)
    assert proc.returncode == 0, proc.stderr
    assert count_pattern_pages(streamed, fx.pattern_page) >= fx.mb * 256
    both = run_agent(["capture", "process", str(fx.pid), "-o", "-", "--json"], tmp_path)
    assert both.returncode == 2
    fx.assert_untouched()


def test_capture_by_name(tmp_path: Path) -> None:
    name = f"kdlname{os.getpid() % 10000}"
    exe = tmp_path / name
    shutil.copy("/bin/sleep", exe)
    procs = [subprocess.Popen([str(exe), "300"]) for _ in range(2)]
    try:
        wait_for(lambda: all(Path(f"/proc/{p.pid}/comm").read_text().strip() == name
                             for p in procs), 10, "the sleepers")
        store = tmp_path / "s"
        amb = run_agent(["capture", "process", name, "-o", f"{store}/"], tmp_path)
        assert amb.returncode == 2
        line = assert_one_error_line(amb)
        assert str(procs[0].pid) in line and str(procs[1].pid) in line
        r = run_agent(["capture", "process", name, "--newest", "-o", f"{store}/", "--json"],
                      tmp_path)
        assert r.returncode == 0, r.stderr
        assert json_out(r)["pid"] == max(procs, key=lambda p: p.pid).pid
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_list_info_verify_prune_debug(tmp_path: Path, fx: Fixture) -> None:
    store = tmp_path / "store"
    ids = [str(_capture(tmp_path, fx.pid, store)["id"]) for _ in range(3)]
    assert len(set(ids)) == 3
    d = ["-D", str(store)]

    listed = json_out(run_agent(["list", *d, "--json"], tmp_path))
    assert [r["id"] for r in listed] == ids
    assert all(r["status"] == "present" for r in listed)
    human = run_agent(["list", *d], tmp_path)
    assert human.returncode == 0 and all(i in human.stdout for i in ids)

    info = json_out(run_agent(["info", ids[0], *d, "--json"], tmp_path))
    assert info["snapshot"]["id"] == ids[0] and info["status"] == "present"
    assert info["dump"]["kind"] == "process" and info["dump"]["cpus_or_threads"] >= 1
    by_path = json_out(run_agent(["info", str(store / listed[0]["file"]), "--json"], tmp_path))
    assert by_path["snapshot"]["sha256"] == listed[0]["sha256"]

    for ident in ids:
        ok = run_agent(["verify", ident, *d, "--json"], tmp_path)
        assert ok.returncode == 0, ok.stderr
        v = json_out(ok)
        assert v["ok"] and v["checks"] == {"pages": "ok", "size": "ok", "sha256": "ok"}
        assert v["pages"] > 0

    # one flipped byte in a page: the pages still decode, the recorded sha256 does not match
    victim = store / listed[1]["file"]
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0xFF
    victim.write_bytes(bytes(data))
    bad = run_agent(["verify", str(victim)], tmp_path)
    assert bad.returncode == 65
    assert "sha256" in assert_one_error_line(bad)
    # a dump with no record (a copy elsewhere) verifies by reading its pages only
    copy = tmp_path / "copy.core"
    shutil.copy(store / listed[0]["file"], copy)
    alone = json_out(run_agent(["verify", str(copy), "--json"], tmp_path))
    assert alone["ok"] and alone["checks"]["sha256"] == "no record"
    # a truncated copy does not read back
    copy.write_bytes(copy.read_bytes()[: copy.stat().st_size // 2])
    assert run_agent(["verify", str(copy)], tmp_path).returncode == 65

    # gdb opens the newest core with the recorded executable
    dbg = run_agent(["debug", ids[2], *d, "-A", "-batch -ex 'info threads'"], tmp_path)
    assert dbg.returncode == 0, dbg.stderr
    assert "Core was generated by" in dbg.stdout + dbg.stderr
    assert f"{fx.pid}" in dbg.stdout + dbg.stderr

    # something that is not ours: a lookalike dump with a forged record (wrong inode)
    foreign = store / "python3-19990101T000000Z.core"
    foreign.write_bytes(b"not ours")
    forged = dict(json.loads((store / f"{ids[0]}.json").read_text()))
    forged.update(id="python3-19990101T000000Z", file=foreign.name, time_unix=1.0)
    (store / "python3-19990101T000000Z.json").write_text(json.dumps(forged))

    dry = json_out(run_agent(["prune", *d, "--keep", "1", "--dry-run", "--json"], tmp_path))
    assert len(dry["removed"]) == 3 and all((store / f"{i}.json").exists() for i in ids)
    pruned = json_out(run_agent(["prune", *d, "--keep", "1", "--json"], tmp_path))
    assert set(pruned["removed"]) == {ids[0], ids[1], "python3-19990101T000000Z"}
    left = json_out(run_agent(["list", *d, "--json"], tmp_path))
    assert [r["id"] for r in left] == [ids[2]]
    assert foreign.read_bytes() == b"not ours", "prune deleted a file it did not write"
    assert not (store / listed[0]["file"]).exists()
    fx.assert_untouched()


def test_exit_codes(tmp_path: Path) -> None:
    # 69: no such process
    gone = run_agent(["capture", "process", "4194000", "-o", f"{tmp_path}/s/"], tmp_path)
    assert gone.returncode == 69
    assert "4194000" in assert_one_error_line(gone)
    # 2: usage errors, one line each
    for args in (["capture", "process"], ["capture", "process", "1", "-d", "99"],
                 ["capture", "process", "1", "--no-such-option"], ["frobnicate"],
                 ["capture", "process", "1", "--annotate", "novalue"]):
        bad = run_agent(args, tmp_path)
        assert bad.returncode == 2, (args, bad.stderr)
        assert_one_error_line(bad)
    # 78: a config with a bad key names the key
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[output]\ndirectory = "/tmp/x"\ncompresion = "zstd"\n')
    conf = run_agent(["capture", "process", "1", "--config", str(cfg)], tmp_path)
    assert conf.returncode == 78
    assert "output.compresion: unknown key" in assert_one_error_line(conf)
    # 78 also for values, and for a missing --config file
    cfg.write_text('[targets.web]\ntype = "process"\nprocess = "x"\ninterval = "5 parsecs"\n')
    conf = run_agent(["list", "--config", str(cfg)], tmp_path)
    assert conf.returncode == 78 and "targets.web.interval" in assert_one_error_line(conf)
    missing = run_agent(["list", "--config", str(tmp_path / "nope.toml")], tmp_path)
    assert missing.returncode == 78
    # -v adds the traceback
    verbose = run_agent(["capture", "process", "4194000", "-o", f"{tmp_path}/s/", "-v"], tmp_path)
    assert verbose.returncode == 69 and "Traceback" in verbose.stderr


def test_permission_denied_77(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        tiers.missing("ptrace", "needs root and setpriv to run the agent as nobody")
    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    # pytest's tmp_path sits in a 0700 directory: nobody needs one it can reach
    base = Path(tempfile.mkdtemp(prefix="kdl-nobody-", dir="/tmp"))
    try:
        base.chmod(0o755)
        out = base / "open"
        out.mkdir()
        out.chmod(0o777)
        env = clean_env(base, XDG_STATE_HOME=str(out / "xdg"))
        with fixture_process(mb=1) as fx:  # a root process: nobody may not ptrace it
            denied = run_agent(["capture", "process", str(fx.pid), "-o", f"{out}/s/"], base,
                               env=env, prefix=as_nobody)
            assert denied.returncode == 77, denied.stderr
            line = assert_one_error_line(denied)
            assert f"process {fx.pid}" in line and "CAP_SYS_PTRACE" in line
            assert not list((out / "s").glob("*.core")) and not list((out / "s").glob("*.json"))
            fx.assert_untouched()
        with fixture_process(mb=1, user=NOBODY) as own:
            # nobody cannot create a snapshot directory under a root-owned one
            (base / "root-only").mkdir(mode=0o755)
            cfg = base / "agent.toml"
            cfg.write_text(f'[output]\ndirectory = "{base}/root-only/store"\n')
            cfg.chmod(0o644)
            store = run_agent(["capture", "process", str(own.pid), "--config", str(cfg)], base,
                              env=env, prefix=as_nobody)
            assert store.returncode == 77, store.stderr
            assert "snapshot directory" in assert_one_error_line(store)
            # ... but its own process into a directory it may write works
            ok = run_agent(["capture", "process", str(own.pid), "-o", f"{out}/mine/", "--json"],
                           base, env=env, prefix=as_nobody)
            assert ok.returncode == 0, ok.stderr
            assert Path(json_out(ok)["path"]).stat().st_uid == NOBODY
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_store_refuses_symlink(tmp_path: Path, fx: Fixture) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[output]\ndirectory = "{link}"\n')
    proc = run_agent(["capture", "process", str(fx.pid), "--config", str(cfg)], tmp_path)
    assert proc.returncode == 77
    assert "symlink" in assert_one_error_line(proc)
    assert list(real.iterdir()) == []


def test_disk_full_74(tmp_path: Path) -> None:
    with tmpfs("1m") as mnt, fixture_process(mb=8) as fx:
        cfg = tmp_path / "agent.toml"
        cfg.write_text(f'[output]\ndirectory = "{mnt}/store"\n'
                       "[retention]\nkeep = 0\nmax_use = 0\nkeep_free = 0\n")
        proc = run_agent(["capture", "process", str(fx.pid), "--config", str(cfg)], tmp_path)
        assert proc.returncode == 74, proc.stderr
        line = assert_one_error_line(proc)
        assert "No space left" in line
        # nothing half-written: no dump, no .incomplete, no record
        assert sorted(p.name for p in (mnt / "store").iterdir()) == [".locks"]
        fx.assert_untouched()


def _store_usage(store: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in store.iterdir() if p.suffix == ".core")


def test_retention_on_a_tmpfs_that_fills_up(tmp_path: Path) -> None:
    with tmpfs("48m") as mnt, fixture_process(mb=6) as fx:
        store = mnt / "store"
        store.mkdir(mode=0o700)
        # a file the agent did not write, taking space in the same store
        foreign = store / "someone-elses.core"
        foreign.write_bytes(os.urandom(4 << 20))
        cfg = tmp_path / "agent.toml"

        # max_use: the agent's own snapshots stay under 20 MiB, oldest of the target go first
        cfg.write_text(f'[output]\ndirectory = "{store}"\n'
                       '[retention]\nkeep = 0\nmax_use = "20M"\nkeep_free = 0\n')
        results = []
        for _ in range(6):
            proc = run_agent(["capture", "process", str(fx.pid), "--config", str(cfg),
                              "--json"], tmp_path)
            assert proc.returncode == 0, proc.stderr
            results.append(json_out(proc))
            assert _store_usage(store) - foreign.stat().st_blocks * 512 <= 20 << 20
        size = results[0]["bytes_out"]
        assert isinstance(size, int) and size > 5 << 20
        kept = [r["id"] for r in json_out(run_agent(["list", "-D", str(store), "--json"],
                                                    tmp_path))]
        assert kept[-1] == results[-1]["id"]  # the newest is never the victim
        assert len(kept) == (20 << 20) // size
        assert any(r["pruned"] for r in results)

        # disk full: no size limits, the tmpfs runs out; the oldest snapshot of the target is
        # pruned, the capture retried, and the foreign file survives
        cfg.write_text(f'[output]\ndirectory = "{store}"\n'
                       "[retention]\nkeep = 0\nmax_use = 0\nkeep_free = 0\n")
        saw_full_prune = False
        for _ in range(12):
            proc = run_agent(["capture", "process", str(fx.pid), "--config", str(cfg),
                              "--json"], tmp_path)
            assert proc.returncode in (0, 74), proc.stderr
            if proc.returncode == 0 and json_out(proc)["pruned"]:
                saw_full_prune = True
                assert "disk full" in proc.stderr
                break
        assert saw_full_prune, "the tmpfs never filled up"
        assert foreign.stat().st_size == 4 << 20
        assert not list(store.glob("*.incomplete"))
        for rec in json_out(run_agent(["list", "-D", str(store), "--json"], tmp_path)):
            assert rec["status"] == "present"
            assert run_agent(["verify", rec["id"], "-D", str(store)], tmp_path).returncode == 0
        fx.assert_untouched()


def test_sigterm_during_capture_leaves_nothing(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with fixture_process(mb=1536) as fx:
        proc = subprocess.Popen([*agent_argv(), "capture", "process", str(fx.pid), "-o",
                                 f"{store}/"], env=clean_env(tmp_path),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            def writing() -> bool:
                return any(p.stat().st_size > (16 << 20) for p in store.glob("*.incomplete"))
            wait_for(lambda: store.exists() and writing(), 60, "the capture to be under way",
                     step=0.005)
            proc.send_signal(signal.SIGTERM)
            _out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 128 + signal.SIGTERM, err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and "SIGTERM" in lines[0], err
        assert sorted(p.name for p in store.iterdir()) == [".locks"]
        fx.assert_untouched()


def test_convert_and_raw_kernel_dumps(tmp_path: Path) -> None:
    from tests import testdumps

    m = testdumps.x86_64_machine()
    vmcore = tmp_path / "in.vmcore"
    testdumps.pack_elf_vmcore(vmcore, m)
    out = tmp_path / "out.kdump"
    proc = run_agent(["convert", str(vmcore), str(out), "-c", "-d", "1", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    r = json_out(proc)
    assert r["format"] == "kdump" and r["codec"] == "zlib" and r["kind"] == "kernel"
    from kdumpling.reader import open_dump
    with open_dump(out) as d:
        pages = dict(d.iter_pages())
    for pfn in m.pfns():
        assert pages.get(pfn, bytes(testdumps.PAGE)) == m.page(pfn), hex(pfn)
    assert run_agent(["verify", str(out)], tmp_path).returncode == 0
    # flattened to stdout, then verified as a file
    flat = tmp_path / "out.flat"
    with open(flat, "wb") as f:
        proc = run_agent(["convert", str(vmcore), "-", "-z"], tmp_path, stdout=f)
    assert proc.returncode == 0, proc.stderr
    assert flat.read_bytes()[:12] == b"makedumpfile"
    assert run_agent(["verify", str(flat)], tmp_path).returncode == 0
    # raw images + a VMCOREINFO file, into the store
    image = tmp_path / "ram.img"
    with open(image, "wb") as f:
        for region in m.regions:
            f.seek(region.phys)
            f.write(region.data)
    info = tmp_path / "vmcoreinfo.txt"
    info.write_bytes(m.vmcoreinfo)
    phys_map = ",".join(f"{r.phys:#x}:{len(r.data):#x}@0+{r.phys:#x}" for r in m.regions)
    proc = run_agent(["capture", "raw", str(image), "--phys-map", phys_map, "--vmcoreinfo",
                      str(info), "-o", f"{tmp_path}/store/", "-l", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    r = json_out(proc)
    assert r["codec"] == "lzo" and str(r["path"]).endswith(".kdump")
    assert run_agent(["verify", str(r["id"]), "-D", f"{tmp_path}/store"],
                     tmp_path).returncode == 0


def test_progress_bar_only_on_a_terminal(tmp_path: Path, fx: Fixture) -> None:
    import pty

    out = tmp_path / "tty.core"
    pid, master = pty.fork()
    if pid == 0:  # child: stderr is the pty
        argv = agent_argv()
        os.execve(argv[0], [*argv, "capture", "process", str(fx.pid), "-o", str(out)],
                  clean_env(tmp_path))
    chunks = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "100.0%" in text and "ETA" in text and "/s" in text
    # not a terminal: no bar
    piped = run_agent(["capture", "process", str(fx.pid), "-o", str(out), "-f"], tmp_path)
    assert piped.returncode == 0 and "ETA" not in piped.stderr
