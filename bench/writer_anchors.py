"""The anchor the bench installs itself: kdumpling 0.4.0 from PyPI in a throwaway venv, and
the script that runs its seed API (cp and makedumpfile are plain commands in bench_writer).
"""

from __future__ import annotations

import os
import shutil
import subprocess

from writer_runs import log

OLD_VERSION = "0.4.0"


def ensure_old_venv(workdir: str) -> str:
    venv = os.path.join(workdir, f"venv-kdumpling-{OLD_VERSION}")
    py = os.path.join(venv, "bin", "python")
    probe = [py, "-c", "import kdumpling, importlib.metadata as m; "
                       f"assert m.version('kdumpling') == '{OLD_VERSION}'"]
    # cwd: the work dir, so that a checkout's egg-info in the current directory is not found.
    if os.path.exists(py) and subprocess.run(probe, capture_output=True,
                                             cwd=workdir).returncode == 0:
        return py
    log(f"installing kdumpling=={OLD_VERSION} from PyPI into {venv}")
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run(["python3", "-m", "venv", venv], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    f"kdumpling=={OLD_VERSION}"], check=True)
    subprocess.run(probe, check=True, cwd=workdir)
    return py


# The 0.4.0 run: its seed API only (run, never copied). It reads a path segment whole.
OLD_SCRIPT = r"""
import json, os, sys, time
from kdumpling import KdumpBuilder, OutputFormat, CompressionType
img, size, out, level, vmci = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), \
    sys.argv[5]
b = KdumpBuilder(arch="x86_64")
b.set_vmcoreinfo(vmci)
b.add_memory_segment(0, img)
t0 = time.perf_counter()
b.write(out, format=OutputFormat.KDUMP_COMPRESSED, compression=CompressionType.ZLIB,
        compression_level=level)
t1 = time.perf_counter()
fd = os.open(out, os.O_RDONLY); os.fsync(fd); os.close(fd)
t2 = time.perf_counter()
print(json.dumps({"seconds": t1 - t0, "sync": t2 - t1, "bytes_in": size,
                  "bytes_out": os.stat(out).st_size}))
"""
