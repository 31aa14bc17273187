"""Child processes in their own process groups, logging to files: shared by the end-to-end test
and ``make demo``, which start the same services (Redis, ``dpal serve``, ``dpal worker``)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Service:
    """A subprocess in its own process group (so signals to it reach its children too)."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    offset: int = 0  # bytes of the log already returned by new_lines()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM to the group, SIGKILL after ``timeout`` seconds (and to stragglers after that)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):  # an RQ work-horse may outlive its parent
            os.killpg(self.proc.pid, signal.SIGKILL)

    def new_lines(self) -> list[str]:
        """Whole lines appended to the log since the last call."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        return data[:end].decode(errors="replace").splitlines()

    def tail(self, lines: int = 40) -> list[str]:
        """The last ``lines`` lines of the log ([] when there is none yet)."""
        try:
            return self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except FileNotFoundError:
            return []


def spawn(name: str, cmd: list[str], env: dict[str, str], log_dir: Path, cwd: Path) -> Service:
    """Start ``cmd`` in a new session, appending its output to ``<log_dir>/<name>.log``."""
    log_path = log_dir / f"{name}.log"
    offset = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    return Service(name, proc, log_path, offset)
