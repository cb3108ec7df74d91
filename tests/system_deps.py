"""For tests that start system programs: Debian packages (PostgreSQL, Chromium) installed by the project's script
when missing, and free loopback ports for the servers they start.

`make test` runs scripts/install-system-deps.sh first; calling it again here makes a bare `pytest` work too.
Where it cannot install (no root or sudo, no apt-get), the test skips and says why.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "install-system-deps.sh"


def require(group: str, present: Callable[[], bool]) -> None:
    """Skip the calling test, with the installer's reason, if ``group``'s packages are missing and stay so."""
    if present():
        return
    done = subprocess.run(["bash", str(SCRIPT), group], capture_output=True, text=True, timeout=900)
    if not present():
        reason = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        pytest.skip(f"{group} is not installed and {SCRIPT.relative_to(ROOT)} could not install it: {reason[0]}")


def free_port() -> int:
    """A loopback port nothing listens on now, for a server a test starts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
