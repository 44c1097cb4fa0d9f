"""How fast a run's processes end: ``fedq run`` sees its coordinator end at once, and a fedq process
does not spend its exit walking PyTorch's objects in Python's last garbage collections."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from fedq.run import Launcher
from shared.settings import Settings
from tests.support.jobs import service_env

# An exit hook registered before fedq's runs after it (last in, first out): it sees what fedq left.
PROBE = """
import atexit, gc
atexit.register(lambda: print("frozen", gc.get_freeze_count()))
from fedq.cli import main
main(["--help"])
"""


def test_a_fedq_process_freezes_what_is_alive_before_its_last_collections() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=service_env(), timeout=60
    )
    assert done.returncode == 0, done.stderr
    frozen = [line for line in done.stdout.splitlines() if line.startswith("frozen ")]
    assert frozen and int(frozen[-1].split()[1]) > 0, done.stdout[-500:]


def test_the_launcher_is_back_as_soon_as_a_process_ends(tmp_path: Path) -> None:
    launcher = Launcher(Settings(), tmp_path, tmp_path / "keys")
    launcher.procs["coordinator"] = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
    assert not launcher.wait("coordinator", 0.05)  # still running: back after the wait, with False
    started = time.monotonic()
    assert launcher.wait("coordinator", 30)
    assert time.monotonic() - started < 10  # the process's second, not the 30 s asked for
