"""The BOINC client releases the end-to-end tests run under.

Every test that uses the `boinc_client` fixture (tests/conftest.py) runs once
per release, ids `[7.20.5]` (Debian's) and `[8.2.15]` (the newest, from
../shared/boinc-client-8.2.15/). Modules that also run on both engines take
ENGINE_CLIENT_MATRIX instead: both releases on Docker, and Podman under 7.20.5
only. What the client does to a container never depends on the engine (the
client knows nothing of either with --allow_multiple_clients), and a full
engine-by-client product would add a third slow pass of the same suite.
"""

from __future__ import annotations

import os

import pytest

from boincd_containers.testing.boinc import CLIENT_8_2, CLIENTS, DEBIAN_CLIENT, ClientBinaries

CLIENT_PARAMS = [pytest.param(c, id=c.version) for c in CLIENTS]

# For `pytest.mark.parametrize(("engine", "boinc_client"), ENGINE_CLIENT_MATRIX,
# indirect=True)`.
ENGINE_CLIENT_MATRIX = [
    pytest.param("docker", DEBIAN_CLIENT, id=f"docker-{DEBIAN_CLIENT.version}"),
    pytest.param("docker", CLIENT_8_2, id=f"docker-{CLIENT_8_2.version}"),
    pytest.param(
        "podman", DEBIAN_CLIENT, id=f"podman-{DEBIAN_CLIENT.version}", marks=pytest.mark.podman
    ),
]


def require_client(binaries: ClientBinaries) -> ClientBinaries:
    """The release if it is installed and is what it says; else skip, or fail
    where BOINCD_REQUIRE_BOINC=1 (CI: both releases are required)."""
    if not binaries.available():
        why = f"BOINC client {binaries.version} not found at {binaries.boinc} / {binaries.boinccmd}"
        if os.environ.get("BOINCD_REQUIRE_BOINC") == "1":
            pytest.fail(f"{why} (BOINCD_REQUIRE_BOINC=1)")
        pytest.skip(why)
    reported = binaries.reported_version()
    if reported != binaries.version:
        pytest.fail(f"{binaries.boinc} reports version {reported!r}, not {binaries.version}")
    return binaries
