"""A throwaway local image registry for tests (Debian's `docker-registry`).

No registry on the internet is reachable here, so pulls are served by a
distribution v2 registry on 127.0.0.1. dockerd treats 127.0.0.0/8 as an
insecure registry by default (`docker info`: "Insecure Registries:
127.0.0.0/8"), so plain HTTP works with no daemon config. Podman does not: its
CLI needs `--tls-verify=false`, its libpod API `tlsVerify=false`; its
Docker-compatible `/images/create` refuses plain HTTP unless registries.conf
marks the registry insecure.

Pulls are counted from the registry's access log (measured here): a pull by
tag asks for the manifest by tag exactly once. Docker 20.10 sends
`HEAD /manifests/<tag>`, then `GET /manifests/<digest>` only if it lacks that
manifest (none when the image is already there); Podman sends
`GET /manifests/<tag>`. Pushes ask for no manifest. So `pulls()` counts
manifest requests by tag, `manifest_gets()` actual manifest downloads.

Usage (no conftest: a test module defines its own fixture)::

    @pytest.fixture
    def registry(tmp_path: Path) -> Iterator[LocalRegistry]:
        with local_registry(tmp_path) as reg:
            yield reg
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REGISTRY_BINARY = "docker-registry"

_CONFIG = """\
version: 0.1
log:
  level: error
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: {host}
  secret: boincd-test-only
"""

# Combined log format: `... "GET /v2/<name>/manifests/<ref> HTTP/1.1" 200 ...`
_ACCESS = re.compile(r'"(?P<method>[A-Z]+) (?P<path>/v2/\S*) HTTP/[\d.]+" (?P<status>\d{3}) ')
_OBJECT = re.compile(r"^/v2/(?P<repo>.+)/(?P<kind>manifests|blobs)/(?P<ref>[^/?]+)$")


def registry_available() -> bool:
    return shutil.which(REGISTRY_BINARY) is not None


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    status: int


class LocalRegistry:
    """A running registry; `host` is `127.0.0.1:<port>`."""

    def __init__(self, host: str, workdir: Path, process: subprocess.Popen[bytes]) -> None:
        self.host = host
        self.workdir = workdir
        self.process = process
        self.access_log = workdir / "access.log"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def ref(self, repo: str, tag: str = "latest") -> str:
        return f"{self.host}/{repo}:{tag}"

    def requests(self) -> list[Request]:
        found = []
        for line in self.access_log.read_text(errors="replace").splitlines():
            match = _ACCESS.search(line)
            if match:
                found.append(Request(match["method"], match["path"], int(match["status"])))
        return found

    def _count(
        self, kind: str, repo: str | None, methods: tuple[str, ...], by_tag: bool = False
    ) -> int:
        count = 0
        for req in self.requests():
            match = _OBJECT.match(req.path)
            if req.method not in methods or req.status != 200 or match is None:
                continue
            if match["kind"] != kind or (repo is not None and match["repo"] != repo):
                continue
            if by_tag and ":" in match["ref"]:  # `sha256:...`: by digest
                continue
            count += 1
        return count

    def pulls(self, repo: str | None = None) -> int:
        """Pulls by tag (of `repo` only, if given), whether or not they
        downloaded anything."""
        return self._count("manifests", repo, ("GET", "HEAD"), by_tag=True)

    def manifest_gets(self, repo: str | None = None) -> int:
        """Manifests actually downloaded, by tag or digest."""
        return self._count("manifests", repo, ("GET",))

    def blob_gets(self, repo: str | None = None) -> int:
        """Blobs (layers and configs) actually downloaded."""
        return self._count("blobs", repo, ("GET",))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_ready(registry: LocalRegistry, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if registry.process.poll() is not None:
            return False  # e.g. the port was taken between probe and bind
        try:
            with urllib.request.urlopen(registry.url + "/v2/", timeout=2) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.05)
    return False


def start_registry(workdir: Path, *, timeout_s: float = 30.0, attempts: int = 5) -> LocalRegistry:
    """Start a registry storing under `workdir` and wait until it answers."""
    for _ in range(attempts):
        host = f"127.0.0.1:{_free_port()}"
        root = Path(tempfile.mkdtemp(prefix="registry-", dir=workdir))
        config = root / "config.yml"
        (root / "storage").mkdir()
        config.write_text(_CONFIG.format(root=root / "storage", host=host))
        with (root / "access.log").open("wb") as out, (root / "registry.log").open("wb") as err:
            process = subprocess.Popen(
                [REGISTRY_BINARY, "serve", str(config)], stdout=out, stderr=err
            )
        registry = LocalRegistry(host, root, process)
        if _wait_ready(registry, timeout_s):
            return registry
        registry.stop()
    log = (root / "registry.log").read_text(errors="replace")
    raise RuntimeError(f"docker-registry did not start: {log[-2000:]}")


@contextlib.contextmanager
def local_registry(workdir: Path | None = None) -> Iterator[LocalRegistry]:
    """A registry for the duration of the block; storage removed afterwards
    unless `workdir` (e.g. pytest's tmp_path) is the caller's to clean."""
    own = workdir is None
    base = workdir if workdir is not None else Path(tempfile.mkdtemp(prefix="boincd-registry-"))
    registry = start_registry(base)
    try:
        yield registry
    finally:
        registry.stop()
        if own:
            shutil.rmtree(base, ignore_errors=True)


def _run(args: list[str], stdin: bytes | None = None) -> str:
    proc = subprocess.run(args, input=stdin, capture_output=True, timeout=300, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {proc.stderr.decode().strip()}")
    return proc.stdout.decode().strip()


BUSYBOX = Path("/bin/busybox")  # Debian busybox-static: no shared libraries needed
APPLETS = ("sh", "cat", "echo", "ls", "mkdir", "rm", "sleep", "true")


def busybox_rootfs_tar(marker: str, extra: dict[str, bytes] | None = None) -> bytes:
    """A tiny root filesystem; a distinct `marker` gives the layer a distinct
    digest, so the image shares nothing with other tests' images."""
    buf = io.BytesIO()
    files = {"bin/busybox": BUSYBOX.read_bytes(), "etc/marker": marker.encode(), **(extra or {})}
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o755, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
        for applet in APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname, info.mtime = tarfile.SYMTYPE, "busybox", 1_700_000_000
            tar.addfile(info)
    return buf.getvalue()


def import_image(ref: str, rootfs: bytes, *, cli: str = "docker") -> str:
    """`<cli> import` a root filesystem tar as `ref`; returns the image id."""
    # Both print the id last on stdout (docker import has no -q).
    return _run([cli, "import", "-", ref], stdin=rootfs).splitlines()[-1]


def push_image(
    registry: LocalRegistry,
    local_ref: str,
    repo: str,
    tag: str = "latest",
    *,
    cli: str = "docker",
    keep_tag: bool = False,
) -> str:
    """Push a local image as `<registry>/<repo>:<tag>` and return that reference.

    `cli` is `docker` or `podman`. The registry tag made for the push is
    removed again unless `keep_tag`, so a later pull of the reference really
    goes to the registry. Give `local_ref` as a name, not an ID: removing the
    only tag of an image would remove the image.
    """
    remote = registry.ref(repo, tag)
    _run([cli, "tag", local_ref, remote])
    try:
        push = [cli, "push", "-q"]
        if cli == "podman":
            push.append("--tls-verify=false")
        _run([*push, remote])
    finally:
        if not keep_tag:
            _run([cli, "rmi", remote])
    return remote
