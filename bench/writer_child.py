"""What runs inside a measured child (``bench_writer.py --child SPEC``): our write of one input,
through ``write_dump`` or through the seed API exactly as a user calls it.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from writer_elf import image_from_elf, read_elf_core
from writer_images import SYNTH_VMCOREINFO
from writer_runs import fsync_path


def child_main(spec: dict[str, Any]) -> None:
    """In the child: build the image, write it without fsync, then time the fsync."""
    kind = spec["kind"]
    if kind == "ours":
        result = _child_ours(spec)
    else:
        raise SystemExit(f"unknown child kind {kind}")
    print(json.dumps(result))


def _child_ours(spec: dict[str, Any]) -> dict[str, Any]:
    import kdumpling

    inp = spec["input"]
    if inp["type"] == "raw":
        builder = kdumpling.KdumpBuilder(arch="x86_64")
        builder.set_vmcoreinfo(SYNTH_VMCOREINFO)
        builder.add_cpu_context(0, {"rip": 0xFFFFFFFF81000000, "rsp": 0xFFFFC90000003F00})
        builder.add_cpu_context(1, {"rip": 0xFFFFFFFF81000100, "rsp": 0xFFFFC90000007F00})
        builder.add_memory_segment(inp["phys"], kdumpling.FileRangeSource(inp["path"], 0,
                                                                           inp["size"]))
        image = builder.to_image()
    elif inp["type"] == "public":
        return _child_public(spec)
    else:
        image = image_from_elf(inp["path"], spec.get("converter", "bench"), inp.get("max_phys"))
    out = spec["out"]
    t0 = time.perf_counter()
    res = kdumpling.write_dump(
        image, out, format=spec["format"], compression=spec["compression"],
        compression_level=spec.get("level", 1), dump_level=spec["dump_level"],
        threads=spec["threads"], fsync=False,
    )
    t1 = time.perf_counter()
    sync = fsync_path(out)
    return {"seconds": t1 - t0, "sync": sync, "bytes_in": res.bytes_in,
            "bytes_out": os.stat(out).st_size, "pages": res.pages,
            "zero_pages": res.zero_pages, "compressed_pages": res.compressed_pages,
            "raw_pages": res.raw_pages}


def _child_public(spec: dict[str, Any]) -> dict[str, Any]:
    """The seed API exactly as a user calls it: raw memory files handed to
    ``add_memory_segment`` as open binary file objects or as paths, then ``builder.write``
    (which fsyncs: "sync" is 0, the time includes it)."""
    import kdumpling

    inp = spec["input"]
    core = read_elf_core(inp["elf"])
    vmcoreinfo = next(desc for name, _t, desc in core.notes if name == b"VMCOREINFO")
    builder = kdumpling.KdumpBuilder(arch="x86_64")
    builder.set_vmcoreinfo(vmcoreinfo.rstrip(b"\0").decode())
    files = []
    for paddr, path, _size in inp["loads"]:
        if inp["form"] == "fileobj":
            f = open(path, "rb")  # noqa: SIM115 - closed below, after the write
            files.append(f)
            builder.add_memory_segment(paddr, f)
        else:
            builder.add_memory_segment(paddr, path)
    out = spec["out"]
    t0 = time.perf_counter()
    res = builder.write(out, format=kdumpling.OutputFormat.KDUMP_COMPRESSED,
                        compression=spec["compression"],
                        compression_level=spec.get("level", 1), dump_level=spec["dump_level"])
    t1 = time.perf_counter()
    for f in files:
        f.close()
    return {"seconds": t1 - t0, "sync": 0.0, "bytes_in": res.bytes_in,
            "bytes_out": os.stat(out).st_size, "pages": res.pages,
            "zero_pages": res.zero_pages, "compressed_pages": res.compressed_pages,
            "raw_pages": res.raw_pages}
