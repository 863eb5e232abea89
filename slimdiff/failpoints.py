"""Deterministic fault injection for the fault suite: a kill at a named point of the work, never by timing.

``SLIMDIFF_KILL_AT=<point>[@<n>]`` (off unless set) SIGKILLs the whole job the ``n``-th time (default the first) a
process passes ``kill_point`` with a name matching ``<point>`` (``fnmatch`` pattern), as an OOM killer or
``docker kill`` would: every process of the caller's session (the job must run in a session of its own, e.g.
``subprocess.Popen(..., start_new_session=True)``) and of its own process group. Points: ``wrote <path>`` after an
atomic write renamed its file into place, ``writing <path>`` just before (the temporary complete, the final name not
yet), ``evaluate batch`` after each batch the evaluation generated with both models.
"""

from __future__ import annotations

import fnmatch
import os
import signal

KILL_AT = "SLIMDIFF_KILL_AT"

_passes: dict[str, int] = {}


def kill_point(name: str) -> None:
    """Nothing, unless ``SLIMDIFF_KILL_AT`` names this point and this is its n-th pass: then SIGKILL the job."""
    spec = os.environ.get(KILL_AT)
    if not spec:
        return
    pattern, _, count = spec.rpartition("@") if "@" in spec else (spec, "", "1")
    if not fnmatch.fnmatchcase(name, pattern):
        return
    _passes[pattern] = _passes.get(pattern, 0) + 1
    if _passes[pattern] != int(count):
        return
    for group in dict.fromkeys((os.getsid(0), os.getpgid(0))):  # the session leader's group first, then our own
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue
    os.kill(os.getpid(), signal.SIGKILL)
