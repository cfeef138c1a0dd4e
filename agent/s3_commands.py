"""What ``verify`` and ``debug`` do with an object (issue 15): stream it back and check it
against its record, or download it to a temporary file for a debugger."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from typing import Any

from kdumpling.errors import FormatError
from kdumpling.layout import ELFMAG, KDUMP_SIGNATURE

from .s3_client import S3Url, iter_object, make_client, s3_errors


def object_facts(url: str) -> dict[str, Any]:
    """The object read back in one streamed GET: its size, sha256 and what its magic says.
    Pages are not decoded (that needs the file: ``debug`` or a download)."""
    target = S3Url.parse(url)
    h = hashlib.sha256()
    size = 0
    magic = b""
    for chunk in iter_object(make_client(), target):
        if len(magic) < 16:
            magic += chunk[: 16 - len(magic)]
        h.update(chunk)
        size += len(chunk)
    fmt = "elf" if magic[:4] == ELFMAG else "kdump" if magic[:8] == KDUMP_SIGNATURE else None
    if fmt is None:
        raise FormatError(f"{url}: neither an ELF core nor a kdump-compressed file", 0, url)
    return {"format": fmt, "bytes": size, "object_bytes": size,
            "object_sha256": h.hexdigest()}


@contextlib.contextmanager
def downloaded(url: str) -> Iterator[str]:
    """The object in a temporary file (0600, in TMPDIR) for as long as the block runs."""
    target = S3Url.parse(url)
    name = os.path.basename(target.key) or "dump"
    with tempfile.TemporaryDirectory(prefix="kdumpling-") as tmp:
        path = os.path.join(tmp, name)
        with s3_errors(f"cannot download {url}"):
            make_client().download_file(target.bucket, target.key, path)
        os.chmod(path, 0o600)
        yield path
