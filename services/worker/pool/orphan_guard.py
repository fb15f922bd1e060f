"""Run a command that dies with its parent: `python orphan_guard.py PARENT_PID -- ARGV...`.

Started as a plain script (no package imports, so it costs only an interpreter start), it asks
the kernel for SIGKILL when its parent dies (Linux prctl PR_SET_PDEATHSIG), checks the parent
is still the one it was started by (if the parent died before the prctl, the signal would never
come), then replaces itself with ARGV (execvp keeps the pid, and the death signal survives exec).

Why not a `preexec_fn`: that forces a plain fork() in a process full of gRPC threads, running
Python in the child between fork and exec; gRPC's fork handlers then crashed the child with
SIGSEGV. Without a preexec_fn, subprocess uses vfork/posix_spawn and no handler runs.
"""

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        sys.stderr.write("usage: orphan_guard.py PARENT_PID -- ARGV...\n")
        os._exit(2)
    parent = int(sys.argv[1])
    argv = sys.argv[3:]
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)  # the parent is already gone
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
