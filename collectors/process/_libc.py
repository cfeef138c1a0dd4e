"""The C library through ctypes, and the one struct its calls here share.

The running interpreter already links the C library: symbols are looked up in the global
namespace (ctypes.util.find_library would spawn ldconfig, 30 ms of start-up).
"""

from __future__ import annotations

import ctypes

libc = ctypes.CDLL(None, use_errno=True)


class IoVec(ctypes.Structure):
    """struct iovec (include/uapi/linux/uio.h): PTRACE_GETREGSET and process_vm_readv."""

    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]
