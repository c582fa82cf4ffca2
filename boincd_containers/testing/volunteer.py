"""A volunteer's host, as far as a BOINC client started without
--allow_multiple_clients sees it: an engine it detects and containers that are
not ours.

Client 8.2 (client/hostinfo_unix.cpp `get_docker_version`) detects an engine at
start by running `podman --version` and `podman run --rm hello-world`, then the
same with `docker`; the first whose output has a line containing "Hello" wins,
and only then does `docker_cleanup` (client/cs_apps.cpp) run: `<cli> ps --all`,
`rm -f` of each container whose name starts with `boinc__` and is not a
started task of a "docker" plan class, with the message "Removed unused Docker
container: NAME". Offline, the probe needs a local `hello-world` image; the
tests build one from busybox and remove it afterwards only if they made it.
Podman is probed first: the tests need Podman's store without a `hello-world`
image, or the client cleans up Podman instead of Docker.

Everything here runs under `single_client_lock()`: one such client per host
at a time, and the hello-world image and decoys belong to whoever holds it.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator

from boincd_containers.testing.daemon import TEST_IMAGE, build_busybox_image, docker
from boincd_containers.testing.names import unique

HELLO_IMAGE = "hello-world:latest"
# On the hello-world images the tests build: tests/prepare_images.py removes one
# that a killed run left behind, never one without it (the machine owner's).
HELLO_LABEL = "org.boincd-test.hello-world"
DECOY_LABEL = "org.boincd-test.decoy"
# What the client's probe looks for in the image's output.
HELLO_TEXT = "Hello from the boincd-containers tests"


def image_id(ref: str) -> str:
    return docker("image", "inspect", "--format", "{{.Id}}", ref, check=False)


def podman_has_hello_world() -> bool:
    if shutil.which("podman") is None:
        return False
    done = subprocess.run(
        ["podman", "image", "exists", "hello-world"], capture_output=True, timeout=60
    )
    return done.returncode == 0


@contextlib.contextmanager
def hello_world_image() -> Iterator[str]:
    """A local `hello-world` whose default command prints "Hello": the 8.2
    client's engine probe then succeeds offline. Built if absent, and then
    removed at the end; an image already there is checked and left alone."""
    if podman_has_hello_world():
        raise RuntimeError(
            "Podman's store has a hello-world image: client 8.2 would detect Podman "
            "first and clean up Podman, not Docker; remove it (podman rmi hello-world)"
        )
    made = ""
    if not image_id(HELLO_IMAGE):
        made = build_busybox_image(
            HELLO_IMAGE, ["echo", HELLO_TEXT], [], expect="Hello", labels={HELLO_LABEL: "1"}
        )
    else:
        out = docker("run", "--rm", "--network", "none", HELLO_IMAGE, check=False)
        if "Hello" not in out:
            raise RuntimeError(f"{HELLO_IMAGE} is here but prints no 'Hello': {out!r}")
    try:
        yield HELLO_IMAGE
    finally:
        if made and image_id(HELLO_IMAGE) == made:
            # -f: any 8.2 client starting meanwhile (other tests' too) probes
            # with `docker run --rm hello-world`, whose container would make a
            # plain rmi fail and leave the image behind.
            docker("rmi", "-f", HELLO_IMAGE, check=False)


def container_exists(name: str) -> bool:
    done = subprocess.run(["docker", "container", "inspect", name], capture_output=True, timeout=60)
    return done.returncode == 0


@contextlib.contextmanager
def decoy_container(image: str = TEST_IMAGE) -> Iterator[str]:
    """A created (never started) container named `boinc__...`, as BOINC's own
    docker_wrapper names them: not ours, so the daemon never touches it, and an
    8.2 client's cleanup must remove it. Removed at the end in any case."""
    name = f"boinc__{unique('decoy')}"
    docker("create", "--name", name, "--network", "none", "--label", f"{DECOY_LABEL}=1", image)
    try:
        yield name
    finally:
        docker("rm", "-f", name, check=False)


def live_boinc_containers() -> list[str]:
    """Running or paused `boinc__*` containers: another test session's tasks
    under the old name scheme, which an 8.2 client's cleanup would destroy."""
    out = docker("ps", "--filter", "name=^boinc__", "--format", "{{.Names}}", check=False)
    return [n for n in out.split() if n.startswith("boinc__")]


def wait_for_no_live_boinc_containers(timeout: float = 120) -> list[str]:
    """Give other sessions' live `boinc__` containers time to finish before a
    cleaning client starts; return those still there (the caller says so)."""
    deadline = time.monotonic() + timeout
    while (live := live_boinc_containers()) and time.monotonic() < deadline:
        time.sleep(1)
    return live
