"""A guardian for processes that must stop on int3s (no marker filter, see seccomp.py).

A small process, started once, holds each such tracee's /proc/PID/mem (passed over a Unix
socket, so it needs no ptrace permission of its own) and the bytes that undo vdsotrace's int3s
there: the original code of every patch, and a nop over each stub's exit int3 (the stub then
runs on into its epilogue). The tracer tells it when a process is clean again. If the tracer
dies instead (SIGKILL, OOM), the kernel closes its end of the socket in exit_files(), before
exit_notify()/exit_ptrace() detach the tracees (kernel/exit.c do_exit), and the guardian writes
those bytes at once: threads that reach a patched place afterwards run the original code. A
thread already stopped at an int3 (or about to execute one before the write lands) still gets
its SIGTRAP: this narrows the window, it does not close it.

The guardian runs in its own session (a Ctrl-C at the terminal does not reach it) and exits
when the socket closes.
"""
from __future__ import annotations

import array
import socket
import subprocess
import sys

__all__ = ["Guardian"]

_CODE = r"""
import array, os, socket, sys
s = socket.socket(fileno=int(sys.argv[1]))
fds, writes = {}, {}
while True:
    try:
        msg, anc, _, _ = s.recvmsg(1 << 16, socket.CMSG_SPACE(4))
    except InterruptedError:
        continue
    except OSError:
        msg = b""
    if not msg:
        break
    kind, _, rest = msg.partition(b" ")
    pid, _, rest = rest.partition(b" ")
    pid = int(pid)
    if kind == b"P":
        for level, typ, data in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                old = fds.pop(pid, None)
                if old is not None:
                    os.close(old)
                fds[pid] = array.array("i", data[:4])[0]
        writes[pid] = []
    elif kind == b"W":
        addr, _, data = rest.partition(b" ")
        writes.setdefault(pid, []).append((int(addr), bytes.fromhex(data.decode())))
    elif kind == b"C":
        writes.pop(pid, None)
        fd = fds.pop(pid, None)
        if fd is not None:
            os.close(fd)
for pid, ws in writes.items():
    fd = fds.get(pid)
    for addr, data in ws if fd is not None else ():
        try:
            os.pwrite(fd, data, addr)
        except OSError:
            pass
"""


class Guardian:
    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.watched: set[int] = set()

    def _start(self) -> socket.socket | None:
        if self._sock is not None:
            return self._sock
        try:
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError:
            return None
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _CODE, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError:
            mine.close()
            return None
        finally:
            theirs.close()
        self._sock = mine
        return mine

    def watch(self, pid: int, mem_fd: int, writes: list[tuple[int, bytes]]) -> bool:
        """Restore `writes` through `mem_fd` if the tracer dies before `forget(pid)`."""
        sock = self._start()
        if sock is None:
            return False
        try:
            sock.sendmsg([b"P %d" % pid], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                            array.array("i", [mem_fd]))])
            for addr, data in writes:
                sock.send(b"W %d %d %s" % (pid, addr, data.hex().encode()))
        except OSError:
            return False
        self.watched.add(pid)
        return True

    def forget(self, pid: int) -> None:
        if pid not in self.watched or self._sock is None:
            return
        self.watched.discard(pid)
        try:
            self._sock.send(b"C %d" % pid)
        except OSError:
            pass

    def close(self) -> None:
        """Every watched process is clean: let the guardian go."""
        for pid in list(self.watched):
            self.forget(pid)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
