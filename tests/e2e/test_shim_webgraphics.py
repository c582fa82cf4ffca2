"""Web graphics under the real BOINC client: the URL the client hands to BOINC
Manager's "Show graphics" answers with the container's page, and a real browser
(headless Chromium) renders it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from boincd_containers.shim.pyz import build_pyz
from boincd_containers.testing.boinc import (
    CLIENT_8_2,
    DEBIAN_CLIENT,
    BoincClient,
    ClientBinaries,
    FileSpec,
    ResultSpec,
    boinc_available,
)
from boincd_containers.testing.daemon import TEST_IMAGE, DaemonProcess
from tests.engine.test_webgraphics_real import get, listening_addresses

pytestmark = [
    pytest.mark.boinc,
    pytest.mark.docker,
    pytest.mark.skipif(
        not boinc_available() and os.environ.get("BOINCD_REQUIRE_BOINC") != "1",
        reason="needs the real BOINC client (apt-get install boinc-client)",
    ),
]

# The raw page says "rendered by" and "a browser" apart; only a browser that runs
# its script has the sentence in its DOM.
PAGE = b"""<!DOCTYPE html>
<html><head><title>task graphics</title></head>
<body><h1>BOINC task graphics</h1><p id="out">not rendered</p>
<script>
document.getElementById("out").textContent = ["rendered by", "a browser"].join(" ");
</script>
</body></html>
"""
RENDERED = "rendered by a browser"
# busybox httpd goes to the background; the app then waits for the test's word.
APP = "httpd -p 80 -h /app; while [ ! -e /app/release ]; do sleep 0.2; done; echo done > out.txt"
JOB = f"""image = "{TEST_IMAGE}"
command = ["sh", "-c", "{APP}"]
web_graphics_guest_port = 80
""".encode()


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def client_results(port: int) -> ET.Element:
    """The GUI RPC get_results answer, as BOINC Manager asks for it (no password
    needed: a read-only RPC, gui_rpc_server_ops.cpp)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"<boinc_gui_rpc_request>\n<get_results/>\n</boinc_gui_rpc_request>\n\x03")
        data = b""
        while not data.endswith(b"\x03"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return ET.fromstring(data.rstrip(b"\x03").decode("utf-8", errors="replace"))


def web_graphics_url(client: BoincClient, result: str) -> str | None:
    for item in client_results(client.port).iter("result"):
        if item.findtext("name") == result:
            url = item.findtext("active_task/web_graphics_url")
            return url.strip() if url else None
    return None


def render(browser: str, url: str) -> str:
    """The DOM after headless Chromium loaded `url` and ran its scripts."""
    profile = tempfile.mkdtemp(prefix="bd-chromium-")
    try:
        done = subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",  # as root
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def shim_pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_pyz(tmp_path_factory.mktemp("pyz") / "boincd-shim.pyz", sys.executable)


@pytest.fixture
def graphics_client(
    request: pytest.FixtureRequest, short_tmp: Path, daemon: DaemonProcess, shim_pyz: Path
) -> Iterator[BoincClient]:
    binaries: ClientBinaries = request.param
    if not binaries.available():
        pytest.skip(f"BOINC client {binaries.version} is not installed here")
    client = BoincClient(
        short_tmp / "boinc",
        shim_pyz,
        results=[ResultSpec("gfx_1", inputs=[FileSpec("index.html", PAGE)])],
        app_files=[FileSpec("job.toml", JOB)],
        env={**os.environ, "BOINCD_SOCKET": daemon.socket},
        binaries=binaries,
    )
    try:
        client.start()
        yield client
    finally:
        client.close()


@pytest.mark.parametrize(
    "graphics_client",
    [pytest.param(DEBIAN_CLIENT, id="7.20.5"), pytest.param(CLIENT_8_2, id="8.2.15")],
    indirect=True,
)
def test_the_url_the_client_shows_serves_the_container_page_to_a_browser(
    graphics_client: BoincClient,
) -> None:
    browser = chromium()
    if browser is None:
        pytest.skip("needs Chromium (apt-get install chromium; scripts/setup.sh --test)")
    client = graphics_client
    url: str = client.wait_for(
        lambda: web_graphics_url(client, "gfx_1"), 90, "the client to know the graphics URL"
    )
    host, _, port = url.removeprefix("http://").rstrip("/").partition(":")
    assert host == "127.0.0.1"
    assert url == f"http://127.0.0.1:{port}/"

    # The app's httpd may still be starting: the relay answers once it listens.
    def page() -> str | None:
        status, text = get(url)
        return text if status == 200 else None

    assert client.wait_for(page, 60, "the container's page") == PAGE.decode()
    dom = render(browser, url)
    assert RENDERED in dom, dom[-2000:]
    assert "not rendered" not in dom
    # The volunteer's host alone: the port listens on the IPv4 loopback only.
    assert listening_addresses(int(port)) == {"0100007F"}
    slot = client.slot_dir("gfx_1")
    assert slot is not None
    assert f"web graphics at {url} (container port 80)" in (slot / "stderr.txt").read_text()

    # The task ends: its graphics go with it.
    (slot / "release").write_text("")
    task = client.wait_done("gfx_1", timeout=90)
    assert (task.state, task.exit_status) == ("uploading", 0)
    client.wait_for(lambda: not listening_addresses(int(port)), 30, "the graphics port closed")
