"""Process hygiene shared by every process of a job: children die with their parent."""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (even by ``kill -9``).

    Called by trainers (whose parent is torchrun) and, through
    ``new_session_dying_with_parent``, in every child the job starts.
    """
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(sig))


def new_session_dying_with_parent() -> None:
    """A ``preexec_fn``: a new session (stopping the child reaches its children) that dies with us."""
    os.setsid()
    die_with_parent()
