"""`spatialrl` commands in sessions of their own, killed whole as a crash kills them."""

import os
import sys
import time
from contextlib import suppress
from pathlib import Path
from subprocess import STDOUT, Popen

import psutil


def spatialrl(argv: list[str], ray_dir: str, log: Path) -> Popen:
    """The command in a session of its own, which the Ray instance it starts shares."""
    env = {**os.environ, "RAY_TMPDIR": ray_dir, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)  # the command starts a Ray instance of its own
    script = Path(sys.executable).parent / "spatialrl"
    return Popen([str(script), *argv], env=env, stdout=log.open("w"), stderr=STDOUT,
                 start_new_session=True)


def kill_session(session: int) -> None:
    """SIGKILL every process of the session: the command, its Ray instance and the Ray
    workers (which have process groups of their own and rename themselves)."""
    deadline = time.monotonic() + 30
    while alive := [p for p in psutil.process_iter() if _in_session(p, session)]:
        assert time.monotonic() < deadline, f"session {session} outlived SIGKILL"
        for process in alive:  # again each round: one may have started a child meanwhile
            with suppress(psutil.NoSuchProcess):
                process.kill()
        time.sleep(0.1)


def _in_session(process: psutil.Process, session: int) -> bool:
    try:
        return os.getsid(process.pid) == session and process.status() != psutil.STATUS_ZOMBIE
    except (ProcessLookupError, psutil.NoSuchProcess):
        return False
