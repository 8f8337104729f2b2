"""Child processes that never outlive the process that started them."""

from __future__ import annotations

import os
import signal
import sys
from typing import Callable

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(death_signal: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` that has the kernel send the child `death_signal` when the launching thread
    dies, even by SIGKILL (Linux; elsewhere None). Otherwise an orphaned child keeps its resources
    (a GPU, a port, a server's memory) and can race the retry. prctl is looked up here, before the
    fork, so the child runs no imports, only system calls."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, death_signal)
        if os.getppid() != parent:  # the launcher died before the request took effect
            os._exit(1)

    return arm
