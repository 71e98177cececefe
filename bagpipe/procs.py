"""Process hygiene shared by every process of a job: children die with their parent, free ports.

One helper each, used by every launcher (the job runner, the servers, the
trainers, the tests), so the fork-safety reasoning lives in one place.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
from typing import Callable

_PR_SET_PDEATHSIG = 1
# Loaded once, at import, in the parent: a forked child must not dlopen (it may hold another
# thread's locks from the moment of the fork), so the preexec function below only calls into it.
_LIBC = ctypes.CDLL(None, use_errno=True)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (even by ``kill -9``).

    Called by a process about itself (a trainer under torchrun); launchers use
    ``child_setup`` instead, which does the same inside the forked child.
    """
    _LIBC.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def child_setup(new_session: bool = True, cpus: set[int] | None = None) -> Callable[[], None]:
    """A ``preexec_fn``: the child dies with this launcher and, by default, leads a new session
    (so stopping it by its pid's group reaches its own children, e.g. torchrun's ranks); with
    ``cpus``, it and everything it starts run on those cores only.

    The kernel signals the child when the *thread* that forked it exits, so
    children should be started from a long-lived thread (the main thread).
    """
    parent = os.getpid()

    def setup() -> None:
        if new_session:
            os.setsid()
        if cpus:
            os.sched_setaffinity(0, cpus)
        _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os._exit(1)

    return setup


def free_ports(host: str, count: int) -> list[int]:
    """``count`` distinct TCP ports free on ``host`` right now (another process may still take one;
    callers that bind later retry with fresh ports or name the port in their error)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(family, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    """One TCP port free on ``host`` right now."""
    return free_ports(host, 1)[0]
