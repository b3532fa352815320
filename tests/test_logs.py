"""Where the request log goes (`serving.request_log`): each mode in a fresh process, as a replica sets it up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPLICA = """
import logging, sys
from pathlib import Path
from flywheel.logs import REQUEST_LOGGER, configure_logging, configure_request_log
configure_logging()
configure_request_log(sys.argv[1], Path(sys.argv[2]))
logging.getLogger(REQUEST_LOGGER).info("event=predict request_id=r-1")
logging.getLogger("flywheel.gateway").info("event=replica_ready")
"""


@pytest.mark.parametrize("mode", ["file", "stderr", "off"])
def test_request_lines_go_where_the_mode_says_and_other_logs_stay_on_stderr(mode: str, tmp_path: Path) -> None:
    ran = subprocess.run([sys.executable, "-c", REPLICA, mode, str(tmp_path / "logs")], cwd=ROOT, text=True,
                         capture_output=True, timeout=60, check=True)
    files = sorted((tmp_path / "logs").glob("requests-*.log"))
    in_file = "".join(f.read_text() for f in files)
    assert "event=replica_ready" in ran.stderr and "event=replica_ready" not in in_file
    assert ("event=predict request_id=r-1" in ran.stderr) == (mode == "stderr")
    assert ("event=predict request_id=r-1" in in_file) == (mode == "file")  # written before the process ended
    assert len(files) == (mode == "file")


def test_an_unwritable_request_log_directory_sends_the_lines_to_stderr(tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    ran = subprocess.run([sys.executable, "-c", REPLICA, "file", str(blocked / "logs")], cwd=ROOT, text=True,
                         capture_output=True, timeout=60, check=True)
    assert "event=request_log_unwritable" in ran.stderr and "event=predict request_id=r-1" in ran.stderr
