"""A thin ctypes layer over ptrace(2) for the process collector.

Only the seize-based requests are used (PTRACE_SEIZE does not send SIGSTOP, so the target's
parent and job control never see a stop): SEIZE, INTERRUPT, GETREGSET, GETEVENTMSG, GETSIGMASK,
DETACH. Request numbers are the generic ones from include/uapi/linux/ptrace.h, the same on every
architecture we support. Errors come back as plain ``OSError`` with the C errno; the collector
decides what they mean. Memory reads use process_vm_readv(2) (``vm_read``).
"""

from __future__ import annotations

import ctypes
import errno
import os

PTRACE_CONT = 7
PTRACE_DETACH = 17
PTRACE_GETEVENTMSG = 0x4201
PTRACE_GETREGSET = 0x4204
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_GETSIGMASK = 0x420A

PTRACE_O_TRACECLONE = 0x08
PTRACE_O_TRACEEXEC = 0x10

PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_EXEC = 4
PTRACE_EVENT_STOP = 128

# waitpid flag: wait for clone children (threads) too (include/uapi/linux/wait.h)
WALL = 0x40000000

# The running interpreter already links the C library: look ptrace up in the global namespace
# (ctypes.util.find_library would spawn ldconfig, 30 ms of start-up).
_libc = ctypes.CDLL(None, use_errno=True)
_ptrace = _libc.ptrace
_ptrace.restype = ctypes.c_long
_ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


# process_vm_readv(2) copies straight from the target's pages into ours (no bounce page, as
# /proc/PID/mem uses), into a bytes object created uninitialised through the C API: no
# zero-filling, no second copy. glibc >= 2.15 has the wrapper.
_vm_readv = getattr(_libc, "process_vm_readv", None)
if _vm_readv is not None:
    _vm_readv.restype = ctypes.c_ssize_t
    _vm_readv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p,
                          ctypes.c_ulong, ctypes.c_ulong]
_bytes_new = ctypes.pythonapi.PyBytes_FromStringAndSize
_bytes_new.restype = ctypes.py_object
_bytes_new.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
_bytes_ptr = ctypes.pythonapi.PyBytes_AsString
_bytes_ptr.restype = ctypes.c_void_p
_bytes_ptr.argtypes = [ctypes.py_object]


def vm_read(pid: int, addr: int, length: int) -> bytes:
    """Up to ``length`` bytes of ``pid``'s memory at ``addr``; fewer (maybe none) when a page
    cannot be read this way. Unlike /proc/PID/mem it follows the pid, not an mm, and does not
    force access to PROT_NONE pages: callers fall back to pread for the rest."""
    if _vm_readv is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    out: bytes = _bytes_new(None, length)
    local = _IoVec(_bytes_ptr(out), length)
    remote = _IoVec(addr, length)
    n: int = _vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if n < 0:
        err = ctypes.get_errno()
        if err != errno.EFAULT:
            raise OSError(err, os.strerror(err))
        n = 0
    return out if n == length else out[:n]


def _call(request: int, tid: int, addr: int | None, data: int | None) -> int:
    ctypes.set_errno(0)
    res: int = _ptrace(request, tid, addr, data)
    if res == -1:
        err = ctypes.get_errno()
        if err:
            raise OSError(err, os.strerror(err))
    return res


def seize(tid: int, options: int = 0) -> None:
    _call(PTRACE_SEIZE, tid, None, options)


def interrupt(tid: int) -> None:
    _call(PTRACE_INTERRUPT, tid, None, None)


def detach(tid: int, signal: int = 0) -> None:
    """Detach a stopped tracee, delivering ``signal`` (a signal-delivery-stop's signal) or 0."""
    _call(PTRACE_DETACH, tid, None, signal)


def geteventmsg(tid: int) -> int:
    msg = ctypes.c_ulong(0)
    _call(PTRACE_GETEVENTMSG, tid, None, ctypes.addressof(msg))
    return msg.value


def getsigmask(tid: int) -> int:
    mask = ctypes.c_uint64(0)
    _call(PTRACE_GETSIGMASK, tid, ctypes.sizeof(mask), ctypes.addressof(mask))
    return mask.value


class RegsetReader:
    """PTRACE_GETREGSET into one reused buffer; the kernel shortens iov_len to the real size."""

    def __init__(self, size: int = 1 << 16) -> None:
        self._buf = ctypes.create_string_buffer(size)
        self._iov = _IoVec(ctypes.addressof(self._buf), size)
        self._size = size

    def get(self, tid: int, note_type: int) -> bytes:
        self._iov.iov_len = self._size
        _call(PTRACE_GETREGSET, tid, note_type, ctypes.addressof(self._iov))
        return self._buf.raw[: self._iov.iov_len]
