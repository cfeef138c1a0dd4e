"""Snapshots into a bucket (issue 15), against moto's S3 server over HTTP: the agent runs as a
subprocess with boto3's standard environment (AWS_ENDPOINT_URL, keys, region) pointing at it.

What is checked: the object is the ordinary file (ELF for a process, kdump-compressed for a
kernel, read back by pyelftools, libkdumpfile, drgn and crash after download) beside its record
with the sha256 of the object's bytes; list/info/verify/prune/debug on s3:// locations; -o for one
object; --spool; the service; and that failures (missing bucket, no credentials, endpoint gone or
stalled mid-upload, the agent interrupted or killed mid-upload) leave no object and no open
upload, with one line and the documented exit code, and never leave the target stopped."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests import tiers
from tests.agenttools import (
    agent_argv,
    assert_one_error_line,
    clean_env,
    count_pattern_pages,
    fixture_process,
    json_out,
    run_agent,
    wait_for,
)
from tests.readers import crash_osrelease, drgn_program, lkf_open, lkf_read_phys
from tests.s3.conftest import S3Server
from tests.s3.proxy import Relay
from tests.test_sink_parts import kernel_builder

PART = 5 << 20  # S3's minimum, so a few MiB of dump already span several parts

# The agent's peak RSS, from a small parent: a child forked by pytest itself would carry pytest's
# own high-water mark into ru_maxrss (Linux records the old mm's peak at exec).
PEAK_RSS = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write(f"maxrss_kib={usage.ru_maxrss}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def s3_env(tmp: Path, server: S3Server, **extra: str) -> dict[str, str]:
    return clean_env(tmp, **{**server.env, "KDUMPLING_S3_PART_SIZE": str(PART),
                             "KDUMPLING_SPOOL_DIR": str(tmp / "spool"), **extra})


def agent(args: list[str], tmp: Path, server: S3Server, **extra: str) \
        -> subprocess.CompletedProcess[str]:
    return run_agent(args, tmp, env=s3_env(tmp, server, **extra))


def sha256_of(server: S3Server, bucket: str, key: str) -> str:
    h = hashlib.sha256()
    body = server.client().get_object(Bucket=bucket, Key=key)["Body"]
    while chunk := body.read(8 << 20):
        h.update(chunk)
    return h.hexdigest()


def record(server: S3Server, bucket: str, key: str) -> dict[str, Any]:
    body = server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    data: dict[str, Any] = json.loads(body)
    return data


def assert_nothing_left(server: S3Server, bucket: str) -> None:
    assert server.keys(bucket) == []
    assert server.open_uploads(bucket) == []


# -- what a capture stores --------------------------------------------------------------------

@pytest.mark.ptrace
def test_process_capture_into_a_prefix(tmp_path: Path, s3server: S3Server, bucket: str) -> None:
    from elftools.elf.elffile import ELFFile

    with fixture_process(mb=24) as fx:
        proc = agent(["capture", "process", str(fx.pid), "-o", f"s3://{bucket}/snaps/",
                      "--json"], tmp_path, s3server)
        assert proc.returncode == 0, proc.stderr
        fx.assert_untouched()
        r = json_out(proc)
    ident = r["id"]
    assert r["path"] == f"s3://{bucket}/snaps/{ident}.core"
    assert s3server.keys(bucket) == [f"snaps/{ident}.core", f"snaps/{ident}.json"]
    assert s3server.open_uploads(bucket) == []
    stored = record(s3server, bucket, f"snaps/{ident}.json")
    assert stored["state"] == "complete" and "upload_id" not in stored
    assert stored["sha256"] == r["sha256"] == sha256_of(s3server, bucket, f"snaps/{ident}.core")
    assert stored["size"] == r["bytes_out"] > 4 * PART  # several parts
    core = s3server.download(bucket, f"snaps/{ident}.core", tmp_path / "dl.core")
    with open(core, "rb") as f:
        elf = ELFFile(f)
        assert elf.header.e_type == "ET_CORE"
        # the header rewritten at the end (part 1, sent last) has the incomplete flag cleared
        assert elf.header.e_flags == 0
    assert count_pattern_pages(core, fx.pattern_page) >= 24 * 256

    # list, info, verify by ID and by URL
    listed = json_out(agent(["list", "-D", f"s3://{bucket}/snaps/", "--json"], tmp_path,
                            s3server))
    assert [(x["id"], x["status"]) for x in listed] == [(ident, "present")]
    info = json_out(agent(["info", f"s3://{bucket}/snaps/{ident}.core", "--json"], tmp_path,
                          s3server))
    assert info["status"] == "present" and info["snapshot"]["sha256"] == r["sha256"]
    for what in ([ident, "-D", f"s3://{bucket}/snaps/"], [f"s3://{bucket}/snaps/{ident}.core"]):
        v = agent(["verify", *what, "--json"], tmp_path, s3server)
        assert v.returncode == 0, v.stderr
        assert json_out(v)["checks"] == {"pages": "ok", "size": "ok", "sha256": "ok"}

    # an object changed behind our back: verify fails (65), list says so, prune keeps it
    s3server.client().put_object(Bucket=bucket, Key=f"snaps/{ident}.core",
                                 Body=core.read_bytes()[:-4096] + bytes(4096))
    bad = agent(["verify", f"s3://{bucket}/snaps/{ident}.core"], tmp_path, s3server)
    assert bad.returncode == 65 and "differs from the recorded" in assert_one_error_line(bad)
    listed = json_out(agent(["list", "-D", f"s3://{bucket}/snaps/", "--json"], tmp_path,
                            s3server))
    assert listed[0]["status"] == "modified"
    pruned = agent(["prune", "-D", f"s3://{bucket}/snaps/", "--keep", "0", "--max-use", "1"],
                   tmp_path, s3server)
    assert pruned.returncode == 0, pruned.stderr
    assert f"snaps/{ident}.core" in s3server.keys(bucket)


def _vmcore(tmp: Path, mib: int = 24) -> tuple[Path, list[tuple[int, bytes]]]:
    builder, ranges = kernel_builder(mib)
    path = tmp / "in.vmcore"
    builder.write(str(path), format="elf")
    return path, ranges


@pytest.mark.readers
@pytest.mark.parametrize("codec_flag,codec", [("-c", "zlib"), ("-z", "zstd")])
def test_kernel_dump_reads_back_after_download(tmp_path: Path, s3server: S3Server,
                                               bucket: str, codec_flag: str, codec: str) -> None:
    vmcore, ranges = _vmcore(tmp_path, 40)
    proc = agent(["convert", str(vmcore), f"s3://{bucket}/kernels/", "--format", "kdump",
                  codec_flag, "--json"], tmp_path, s3server)
    assert proc.returncode == 0, proc.stderr
    r = json_out(proc)
    key = f"kernels/{r['id']}.kdump"
    assert r["path"] == f"s3://{bucket}/{key}" and r["codec"] == codec
    assert r["bytes_out"] > 2 * PART  # the head is part 1, sent last; data in parts after it
    assert s3server.open_uploads(bucket) == []
    dump = s3server.download(bucket, key, tmp_path / "dl.kdump")
    assert hashlib.sha256(dump.read_bytes()).hexdigest() == r["sha256"]
    assert dump.read_bytes()[:8] == b"KDUMP   "  # the file itself, not a flattened stream
    ctx = lkf_open(str(dump))
    prog = drgn_program(str(dump))
    for phys, data in ranges:
        assert lkf_read_phys(ctx, phys, len(data)) == data
        assert prog.read(phys, len(data), True) == data
    assert crash_osrelease(str(dump)) == "6.1.0-kdl-parts"
    # the header (part 1) was rewritten last: crash sees no "incomplete" flag
    assert ctx.attr["file.format"] == "diskdump"


def test_one_object_with_o_and_force(tmp_path: Path, s3server: S3Server, bucket: str) -> None:
    vmcore, _ = _vmcore(tmp_path, 4)
    url = f"s3://{bucket}/one/guest.kdump"
    first = agent(["convert", str(vmcore), url, "--format", "kdump", "-z", "--json"], tmp_path,
                  s3server)
    assert first.returncode == 0, first.stderr
    r = json_out(first)
    assert r["path"] == url and r["id"] is None
    assert s3server.keys(bucket) == ["one/guest.kdump"]  # no record for one object
    assert r["sha256"] == sha256_of(s3server, bucket, "one/guest.kdump")
    again = agent(["convert", str(vmcore), url, "--format", "kdump"], tmp_path, s3server)
    assert again.returncode == 2 and "--force" in assert_one_error_line(again)
    forced = agent(["convert", str(vmcore), url, "--format", "kdump", "-f"], tmp_path, s3server)
    assert forced.returncode == 0, forced.stderr
    v = agent(["verify", url, "--json"], tmp_path, s3server)
    assert v.returncode == 0 and json_out(v)["format"] == "kdump"


def test_debug_downloads_to_a_temporary_file(tmp_path: Path, s3server: S3Server,
                                             bucket: str) -> None:
    vmcore, _ = _vmcore(tmp_path, 4)
    r = json_out(agent(["convert", str(vmcore), f"s3://{bucket}/d/", "--json"], tmp_path,
                       s3server))
    seen = tmp_path / "seen"
    # the "debugger" copies what it was given, so the test sees the downloaded file
    script = tmp_path / "dbg.sh"
    script.write_text(f'#!/bin/sh\ncp "$1" {seen}\necho "$1" > {seen}.path\n')
    script.chmod(0o755)
    proc = agent(["debug", r["id"], "-D", f"s3://{bucket}/d/", "--debugger", str(script)],
                 tmp_path, s3server)
    assert proc.returncode == 0, proc.stderr
    assert hashlib.sha256(seen.read_bytes()).hexdigest() == r["sha256"]
    assert not os.path.exists(Path(seen.with_suffix(".path").read_text().strip()))  # removed


@pytest.mark.ptrace
def test_spool_writes_locally_then_uploads(tmp_path: Path, s3server: S3Server,
                                           bucket: str) -> None:
    with fixture_process(mb=12) as fx:
        proc = agent(["capture", "process", str(fx.pid), "-o", f"s3://{bucket}/sp/", "--spool",
                      "--json"], tmp_path, s3server)
        assert proc.returncode == 0, proc.stderr
        fx.assert_untouched()
    r = json_out(proc)
    assert r["sha256"] == sha256_of(s3server, bucket, f"sp/{r['id']}.core")
    assert [p.name for p in (tmp_path / "spool").iterdir()] == [".locks"]  # the copy is gone
    assert s3server.open_uploads(bucket) == []


@pytest.mark.ptrace
def test_retention_on_a_bucket(tmp_path: Path, s3server: S3Server, bucket: str) -> None:
    """keep per target; max_use's default percentage does not apply (a bucket has no size)."""
    with fixture_process(mb=2) as fx:
        ids = []
        for _ in range(3):
            proc = agent(["capture", "process", str(fx.pid), "-o", f"s3://{bucket}/r/",
                          "--json"], tmp_path, s3server)
            assert proc.returncode == 0, proc.stderr
            assert json_out(proc)["pruned"] == []
            ids.append(json_out(proc)["id"])
    assert len(s3server.keys(bucket)) == 6
    proc = agent(["prune", "-D", f"s3://{bucket}/r/", "--keep", "1", "--json"], tmp_path,
                 s3server)
    assert proc.returncode == 0, proc.stderr
    assert json_out(proc)["removed"] == ids[:2]
    assert s3server.keys(bucket) == sorted([f"r/{ids[2]}.core", f"r/{ids[2]}.json"])


# -- failures ---------------------------------------------------------------------------------

@pytest.mark.ptrace
def test_missing_bucket(tmp_path: Path, s3server: S3Server) -> None:
    with fixture_process(mb=2) as fx:
        proc = agent(["capture", "process", str(fx.pid), "-o", "s3://kdl-no-such-bucket/x/"],
                     tmp_path, s3server)
        fx.assert_untouched()
    assert proc.returncode == 73
    assert "no such bucket" in assert_one_error_line(proc)
    names = [b["Name"] for b in s3server.client().list_buckets()["Buckets"]]
    assert "kdl-no-such-bucket" not in names


def test_no_credentials(tmp_path: Path, s3server: S3Server, bucket: str) -> None:
    env = s3_env(tmp_path, s3server, AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
                 AWS_CONFIG_FILE=str(tmp_path / "none"))
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    proc = run_agent(["list", "-D", f"s3://{bucket}/"], tmp_path, env=env)
    assert proc.returncode == 77
    assert "no S3 credentials" in assert_one_error_line(proc)


def test_unreachable_endpoint(tmp_path: Path, s3server: S3Server) -> None:
    from tests.s3.conftest import free_port

    t0 = time.monotonic()
    proc = agent(["list", "-D", "s3://bucket/"], tmp_path, s3server,
                 AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",
                 KDUMPLING_S3_MAX_ATTEMPTS="2")
    assert proc.returncode == 69
    assert "cannot reach the S3 endpoint" in assert_one_error_line(proc)
    assert time.monotonic() - t0 < 60


def _start_capture(tmp: Path, server: S3Server, fx_pid: int, url: str,
                   **extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*agent_argv(), "capture", "process", str(fx_pid), "-o", url],
                            env=s3_env(tmp, server, **extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _uploading(server: S3Server, bucket: str, parts: int = 1) -> bool:
    for up in server.open_uploads(bucket):
        listed = server.client().list_parts(Bucket=bucket, Key=up["Key"],
                                            UploadId=up["UploadId"])
        if len(listed.get("Parts", [])) >= parts:
            return True
    return False


@pytest.mark.ptrace
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_agent_interrupted_mid_upload_leaves_nothing(tmp_path: Path, s3server: S3Server,
                                                     bucket: str, sig: int) -> None:
    relay = Relay(int(s3server.endpoint.rsplit(":", 1)[1]))
    with fixture_process(mb=400) as fx:
        proc = _start_capture(tmp_path, s3server, fx.pid, f"s3://{bucket}/i/",
                              AWS_ENDPOINT_URL=relay.endpoint)
        try:
            wait_for(lambda: _uploading(s3server, bucket), 120, "the first part")
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=120)
        finally:
            relay.down()
        assert proc.returncode == 128 + sig, err
        assert "interrupted" in err
        fx.assert_untouched()
    assert_nothing_left(s3server, bucket)


@pytest.mark.ptrace
@pytest.mark.slow
def test_agent_killed_mid_upload_then_prune(tmp_path: Path, s3server: S3Server,
                                            bucket: str) -> None:
    """SIGKILL leaves the upload open and the capturing record naming it; prune (as the next
    run of the service would) aborts the upload and removes the record."""
    with fixture_process(mb=400) as fx:
        proc = _start_capture(tmp_path, s3server, fx.pid, f"s3://{bucket}/k/")
        wait_for(lambda: _uploading(s3server, bucket), 120, "the first part")
        proc.kill()
        proc.communicate(timeout=30)
    assert s3server.open_uploads(bucket) != []
    listed = json_out(agent(["list", "-D", f"s3://{bucket}/k/", "--json"], tmp_path, s3server))
    assert [x["status"] for x in listed] == ["abandoned"]
    assert all(not k.endswith(".core") for k in s3server.keys(bucket))
    pruned = agent(["prune", "-D", f"s3://{bucket}/k/", "--json"], tmp_path, s3server)
    assert pruned.returncode == 0, pruned.stderr
    assert json_out(pruned)["cleaned"] == [listed[0]["id"]]
    assert_nothing_left(s3server, bucket)


@pytest.mark.ptrace
@pytest.mark.slow
def test_endpoint_dies_mid_upload(tmp_path: Path, s3server: S3Server, bucket: str) -> None:
    relay = Relay(int(s3server.endpoint.rsplit(":", 1)[1]))
    with fixture_process(mb=400) as fx:
        t0 = time.monotonic()
        proc = _start_capture(tmp_path, s3server, fx.pid, f"s3://{bucket}/d/",
                              AWS_ENDPOINT_URL=relay.endpoint, KDUMPLING_S3_MAX_ATTEMPTS="2",
                              KDUMPLING_S3_CONNECT_TIMEOUT="2")
        wait_for(lambda: _uploading(s3server, bucket), 120, "the first part")
        relay.down()
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 69, err
        assert "cannot reach the S3 endpoint" in err and len(err.strip().splitlines()) == 1
        assert time.monotonic() - t0 < 180
        fx.assert_untouched()
    # no object; the upload could not be aborted while the endpoint was gone: prune does it
    assert all(not k.endswith(".core") for k in s3server.keys(bucket))
    relay.start()
    pruned = agent(["prune", "-D", f"s3://{bucket}/d/"], tmp_path, s3server,
                   AWS_ENDPOINT_URL=relay.endpoint)
    assert pruned.returncode == 0, pruned.stderr
    assert_nothing_left(s3server, bucket)
    relay.down()


@pytest.mark.ptrace
@pytest.mark.slow
def test_stalled_endpoint_releases_the_target_in_bounded_time(tmp_path: Path,
                                                              s3server: S3Server,
                                                              bucket: str) -> None:
    relay = Relay(int(s3server.endpoint.rsplit(":", 1)[1]))
    with fixture_process(mb=400) as fx:
        proc = _start_capture(tmp_path, s3server, fx.pid, f"s3://{bucket}/s/",
                              AWS_ENDPOINT_URL=relay.endpoint, KDUMPLING_S3_MAX_ATTEMPTS="1",
                              KDUMPLING_S3_READ_TIMEOUT="3", KDUMPLING_S3_STALL_TIMEOUT="5")
        wait_for(lambda: _uploading(s3server, bucket), 120, "the first part")
        relay.stall()
        t0 = time.monotonic()
        # the target runs again within the stall timeout plus a request's timeout
        wait_for(lambda: not fx.status()["State"].startswith(("T", "t")), 60,
                 "the target to run again")
        released = time.monotonic() - t0
        _, err = proc.communicate(timeout=120)
        relay.down()
        assert proc.returncode in (69, 74), err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert released < 30
        fx.assert_untouched()
    assert all(not k.endswith(".core") for k in s3server.keys(bucket))


@pytest.mark.ptrace
@pytest.mark.slow
def test_large_dump_streams_under_a_tiny_tmpdir(tmp_path: Path, s3server: S3Server,
                                                bucket: str) -> None:
    """Several hundred MB through a 4 MiB TMPDIR, no local copy, peak RSS well under 200 MB."""
    from tests.agenttools import tmpfs

    with tmpfs("4m") as tiny, fixture_process(mb=320) as fx:
        env = s3_env(tmp_path, s3server, TMPDIR=str(tiny))
        env.pop("KDUMPLING_S3_PART_SIZE")  # the default part size, as in production
        proc = subprocess.run([sys.executable, "-c", PEAK_RSS, *agent_argv(), "capture",
                               "process", str(fx.pid), "-o", f"s3://{bucket}/big/", "--json"],
                              env=env, capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr
        assert list(tiny.iterdir()) == []
        fx.assert_untouched()
    out = proc.stdout
    usage = int(proc.stderr.rsplit("maxrss_kib=", 1)[1])
    r = json.loads(out)
    peak_mib = usage / 1024
    print(f"\nstreamed {r['bytes_out'] / 2**20:.0f} MiB; agent peak RSS {peak_mib:.0f} MiB")
    assert r["bytes_out"] > 320 << 20
    assert peak_mib < 200
    assert r["sha256"] == sha256_of(s3server, bucket, f"big/{r['id']}.core")


# -- the service ------------------------------------------------------------------------------

@pytest.mark.ptrace
def test_service_writes_to_a_bucket(tmp_path: Path, s3server: S3Server, bucket: str) -> None:
    cfg = tmp_path / "agent.toml"
    with fixture_process(mb=6) as fx:
        cfg.write_text(f'[output]\ndirectory = "s3://{bucket}/svc/"\n'
                       f'[targets.a]\ntype = "process"\npid = {fx.pid}\ncalendar = "yearly"\n')
        proc = agent(["service", "--once", "--config", str(cfg)], tmp_path, s3server)
        assert proc.returncode == 0, proc.stderr
        fx.assert_untouched()
    keys = s3server.keys(bucket)
    assert len(keys) == 2 and keys[0].startswith("svc/a-") and keys[0].endswith(".core")
    rec = record(s3server, bucket, keys[1])
    assert rec["state"] == "complete" and rec["sha256"] == sha256_of(s3server, bucket, keys[0])
    # spool = true in the config: the same, through the spool directory
    cfg.write_text(cfg.read_text().replace("[output]\n", "[output]\nspool = true\n"))
    with fixture_process(mb=6) as fx:
        cfg.write_text(cfg.read_text().replace("pid = ", f"pid = {fx.pid}\n#"))
        proc = agent(["service", "--once", "--config", str(cfg)], tmp_path, s3server)
        assert proc.returncode == 0, proc.stderr
    assert len(s3server.keys(bucket)) == 4
    assert [p.name for p in (tmp_path / "spool").iterdir()] == [".locks"]


def test_service_install_adds_the_network_drop_in(tmp_path: Path) -> None:
    tiers.tool("systemd", "systemctl")  # uninstall disables the units through it
    root = tmp_path / "root"
    config = root / "etc/kdumpling/agent.toml"
    config.parent.mkdir(parents=True)
    config.write_text('[output]\ndirectory = "s3://snapshots/web/"\n')
    proc = run_agent(["service", "install", "--root", str(root), "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    units = root / "etc/systemd/system"
    dropins = sorted(units.glob("*.service.d/50-kdumpling-s3-network.conf"))
    assert [p.parent.name for p in dropins] == ["kdumpling-agent-once.service.d",
                                                "kdumpling-agent.service.d"]
    text = dropins[0].read_text()
    assert "PrivateNetwork=no" in text and "AF_INET" in text
    service = (units / "kdumpling-agent.service").read_text()
    assert "PrivateNetwork=yes" in service and "s3://" not in service  # units unchanged
    analyze = shutil.which("systemd-analyze")
    if analyze is not None:  # systemd parses the drop-in (it names unknown keys on stderr)
        res = subprocess.run([analyze, "verify", "--man=no", "./kdumpling-agent.service",
                              "./kdumpling-agent-once.service"], cwd=units,
                             env={**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"},
                             capture_output=True, text=True, timeout=120, check=False)
        assert res.returncode == 0 and res.stderr.strip() == "", res.stderr
    # back to a local directory: the drop-in goes; uninstall removes it too
    config.write_text('[output]\ndirectory = "/var/lib/kdumpling"\n')
    assert run_agent(["service", "install", "--root", str(root)], tmp_path).returncode == 0
    assert list(units.glob("*.service.d/*")) == []
    config.write_text('[output]\ndirectory = "s3://snapshots/web/"\n')
    assert run_agent(["service", "install", "--root", str(root)], tmp_path).returncode == 0
    assert run_agent(["service", "uninstall", "--root", str(root)], tmp_path).returncode == 0
    assert list(units.glob("*.service.d/*")) == []


@pytest.mark.ptrace
@pytest.mark.slow
def test_a_killed_spooled_capture_is_cleaned_by_prune(tmp_path: Path, s3server: S3Server,
                                                       bucket: str) -> None:
    spool = tmp_path / "spool"
    with fixture_process(mb=200) as fx:
        proc = subprocess.Popen([*agent_argv(), "capture", "process", str(fx.pid), "-o",
                                 f"s3://{bucket}/ks/", "--spool"],
                                env=s3_env(tmp_path, s3server), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        wait_for(lambda: spool.is_dir() and any(p.suffix == ".spool" for p in spool.iterdir()),
                 120, "the spool file")
        proc.kill()
        proc.wait(30)
    assert [p for p in spool.iterdir() if p.suffix == ".spool"] != []
    pruned = agent(["prune", "-D", f"s3://{bucket}/ks/", "--json"], tmp_path, s3server)
    assert pruned.returncode == 0, pruned.stderr
    assert len(json_out(pruned)["cleaned"]) == 1
    assert [p for p in spool.iterdir() if p.suffix == ".spool"] == []
    assert s3server.keys(bucket) == []


@pytest.mark.ptrace
@pytest.mark.slow
def test_sigterm_during_the_spool_upload_leaves_nothing(tmp_path: Path, s3server: S3Server,
                                                        bucket: str) -> None:
    spool = tmp_path / "spool"
    with fixture_process(mb=400) as fx:
        proc = subprocess.Popen([*agent_argv(), "capture", "process", str(fx.pid), "-o",
                                 f"s3://{bucket}/st/", "--spool"],
                                env=s3_env(tmp_path, s3server), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        wait_for(lambda: _uploading(s3server, bucket), 120, "the spool's upload")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        fx.assert_untouched()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert [p for p in spool.iterdir() if p.name != ".locks"] == []
    assert_nothing_left(s3server, bucket)


@pytest.mark.ptrace
def test_bad_credentials(tmp_path: Path, authenticating_s3server: S3Server) -> None:
    server = authenticating_s3server
    with fixture_process(mb=2) as fx:
        proc = agent(["capture", "process", str(fx.pid), "-o", "s3://snapshots/web/"], tmp_path,
                     server, AWS_ACCESS_KEY_ID="AKIAKDUMPLINGBADKEY0",
                     AWS_SECRET_ACCESS_KEY="not-a-secret")
        fx.assert_untouched()
    assert proc.returncode == 77, proc.stderr
    assert "access denied" in assert_one_error_line(proc)


@pytest.mark.ptrace
@pytest.mark.slow
def test_server_killed_mid_upload(tmp_path: Path, own_s3server: S3Server) -> None:
    """The S3 server process itself dies (its state with it): one line, exit 69, the target
    released; the relay test above checks what is left on a server that survives."""
    server = own_s3server
    bucket = server.bucket()
    with fixture_process(mb=400) as fx:
        t0 = time.monotonic()
        proc = _start_capture(tmp_path, server, fx.pid, f"s3://{bucket}/x/",
                              KDUMPLING_S3_MAX_ATTEMPTS="2", KDUMPLING_S3_CONNECT_TIMEOUT="2")
        wait_for(lambda: _uploading(server, bucket), 120, "the first part")
        server.proc.kill()
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 69, err
        assert "cannot reach the S3 endpoint" in err and len(err.strip().splitlines()) == 1
        assert time.monotonic() - t0 < 180
        fx.assert_untouched()
