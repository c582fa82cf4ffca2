"""The example of docs/projects.md, from its own files, under the real BOINC client.

What a project admin copies from the doc must work as written: the .pyz built by
the doc's command, docs/examples/standalone.sh writing the data dir (the
client_state.xml fragments the doc shows), docs/examples/job.toml and count.sh,
run by each client release (7.20.5 and 8.2.15) with the real daemon on dockerd,
to a finished task whose output file the client has copied to the project dir.

The names are the doc's own (standalone.sh writes them), so unlike the other
e2e tests they are not unique per run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from boincd_containers.core import labels as L
from boincd_containers.testing.boinc import (
    RESULT_FILES_UPLOADING,
    BoincClient,
    ClientBinaries,
    ResultSpec,
)
from boincd_containers.testing.daemon import DaemonProcess, docker

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "docs" / "examples"
# The names docs/examples/standalone.sh gives the project and the result.
MASTER_URL = "http://127.0.0.1:1/example/"
RESULT = "count_wu_1_0"

pytestmark = [pytest.mark.boinc, pytest.mark.docker]


def build_pyz_as_documented(out: Path) -> Path:
    """`python3 -m boincd_containers.shim.pyz boincd-shim.pyz`, from the checkout."""
    subprocess.run(
        [sys.executable, "-m", "boincd_containers.shim.pyz", str(out)],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=60,
    )
    return out


def containers_of(result: str) -> list[str]:
    return docker("ps", "-aq", "--filter", f"label={L.RESULT}={result}", check=False).split()


def test_the_docs_example_finishes_with_its_output_file(
    short_tmp: Path, daemon: DaemonProcess, boinc_client: ClientBinaries
) -> None:
    pyz = build_pyz_as_documented(short_tmp / "boincd-shim.pyz")
    data_dir = short_tmp / "boinc"
    # The harness writes its deterministic preferences and the GUI RPC password it
    # drives the client with; the doc's script then writes the project, the app
    # and the task over its client_state.xml, exactly as a reader would run it.
    client = BoincClient(
        data_dir,
        pyz,
        results=[ResultSpec(RESULT)],
        project_name="example",
        master_url=MASTER_URL,
        env={**os.environ, "BOINCD_SOCKET": daemon.socket},
        # As the doc's recipe runs it: signatures are never checked for files the
        # state marks present, and the network switch stays the client's own.
        unsigned_apps_ok=False,
        binaries=boinc_client,
    )
    try:
        written = subprocess.run(
            ["sh", str(EXAMPLES / "standalone.sh"), str(data_dir), str(pyz)],
            env={**os.environ, "BOINC": str(boinc_client.boinc)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert written.returncode == 0, written.stderr
        state = client.client_state_path.read_text()
        assert "<name>count</name>" in state, "standalone.sh did not write the example's app"
        client.start()

        # count.sh counts to 5, a step a second, writing its fraction done and checkpoint.
        running = client.wait_for_task(
            RESULT, lambda t: (t.fraction_done or 0) > 0, 60, "fraction done reported"
        )
        assert 0 < (running.fraction_done or 0) <= 1
        task = client.wait_done(RESULT, timeout=120)
        record = client.wait_final_record(RESULT)
        assert (task.state, task.exit_status) == ("uploading", 0), record.stderr_out
        assert record.state == RESULT_FILES_UPLOADING
        assert client.output_path(RESULT).read_text() == "counted to 5\n"
        # What the doc says a finished task leaves in stderr.txt.
        assert "container finished" in record.stderr_out
        assert "boincd-shim" in record.stderr_out
        client.wait_for(lambda: containers_of(RESULT) == [], 30, "the container removed")
    finally:
        client.close()
