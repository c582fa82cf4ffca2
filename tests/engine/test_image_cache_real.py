"""The image cache of the real daemon on the real dockerd, with a local registry.

Images are built by the tests from one base (a busybox root filesystem with a
unique marker, so nothing is shared with anyone else's images), pushed to a
throwaway registry and removed locally, so the daemon must pull them.

Other engineers' tests use the same dockerd at the same time: comparisons with
`/system/df` cover every image in the engine and are repeated when the image
list changed while measuring; nothing here touches an image it did not make.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from boincd_containers.shim.client import DaemonClient, DaemonError
from boincd_containers.testing.daemon import DaemonProcess, docker
from boincd_containers.testing.local_registry import (
    LocalRegistry,
    busybox_rootfs_tar,
    import_image,
    local_registry,
    push_image,
)
from boincd_containers.testing.names import RUN_ID

pytestmark = pytest.mark.docker

PREFIX = "boincd-imgcache-test"
PROJECT = f"test.example.org_proj_{RUN_ID}"
LAYER = 300_000  # each app image's own layer: one file of this many bytes
# Container names are `boincd__<project>__<result>`: unique results, as other
# test runs may use the same engine at the same time.
RUN = uuid.uuid4().hex[:8]


def engine_get(path: str) -> Any:
    sock = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock").removeprefix("unix://")
    client = DaemonClient(sock, timeout=300)
    try:
        return client.request("GET", path)
    finally:
        client.close()


def image_exists(ref: str) -> bool:
    done = subprocess.run(["docker", "image", "inspect", ref], capture_output=True, timeout=60)
    return done.returncode == 0


def until(
    condition: Callable[[], bool], what: str, daemon: DaemonProcess, timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting until {what}\n{daemon.log()}")


class TestImages:
    """Images this test makes: a base, and apps on it pushed to the registry."""

    def __init__(self, registry: LocalRegistry, workdir: Path) -> None:
        self.registry = registry
        self.workdir = workdir
        self.uid = uuid.uuid4().hex[:12]
        self.ids: list[str] = []  # removed at the end, newest first
        self.base = f"{PREFIX}/base-{self.uid}:1"
        self.ids.append(import_image(self.base, busybox_rootfs_tar(self.uid)))

    __test__ = False

    def build(self, name: str, size: int = LAYER, *, tag: str = "1") -> tuple[str, str]:
        """A local image `FROM base` plus one file of `size` bytes: (ref, id)."""
        ctx = self.workdir / f"ctx-{name}-{tag}"
        ctx.mkdir()
        (ctx / "data").write_bytes(os.urandom(size))
        (ctx / "Dockerfile").write_text(f"FROM {self.base}\nCOPY data /{name}-{tag}\n")
        ref = f"{PREFIX}/{name}-{self.uid}:{tag}"
        done = subprocess.run(
            ["docker", "build", "-q", "-t", ref, str(ctx)],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "DOCKER_BUILDKIT": "0"},
            check=False,
        )
        assert done.returncode == 0, done.stderr
        image_id = docker("image", "inspect", "--format", "{{.Id}}", ref)
        self.ids.append(image_id)
        return ref, image_id

    def pushed(
        self, name: str, size: int = LAYER, *, tag: str = "1", as_tag: str = "1"
    ) -> tuple[str, str]:
        """An app image in the registry only (not here): (remote ref, id)."""
        local, image_id = self.build(name, size, tag=tag)
        remote = push_image(self.registry, local, f"{PREFIX}/{name}-{self.uid}", as_tag)
        docker("rmi", local)
        return remote, image_id

    def cleanup(self) -> None:
        for image_id in reversed(self.ids):
            docker("rmi", "-f", image_id, check=False)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[LocalRegistry]:
    with local_registry(tmp_path) as reg:
        yield reg


@pytest.fixture
def images(registry: LocalRegistry, tmp_path: Path, docker_engine: str) -> Iterator[TestImages]:
    made = TestImages(registry, tmp_path)
    try:
        yield made
    finally:
        made.cleanup()


@pytest.fixture
def make_daemon(short_tmp: Path, images: TestImages) -> Iterator[Callable[..., DaemonProcess]]:
    """A real daemon with the given settings (config.toml). It goes, with its
    containers, before the test's images do (an image in use cannot be removed)."""
    started: list[DaemonProcess] = []

    def make(**settings: Any) -> DaemonProcess:
        base = short_tmp / f"d{len(started)}"
        base.mkdir()
        lines = ["relist_interval_s = 5.0"] + [
            f"{k} = {json.dumps(v)}" for k, v in settings.items()
        ]
        (base / "config.toml").write_text("\n".join(lines) + "\n")
        process = DaemonProcess(base)
        started.append(process)
        return process.start()

    try:
        yield make
    finally:
        for process in started:
            process.kill()
            process.cleanup_engine_objects()


def slot(daemon: DaemonProcess, result: str) -> Path:
    path = daemon.base / f"slot-{result}"
    path.mkdir(exist_ok=True)
    return path


def create(daemon: DaemonProcess, result: str, **job: Any) -> dict[str, Any]:
    body = {
        "result": result,
        "project": PROJECT,
        "slot_dir": str(slot(daemon, result)),
        "command": ["sh", "-c", "sleep 300"],
        **job,
    }
    daemon.request("POST", "/v1/tasks", body)
    task: dict[str, Any] = {}

    def settled() -> bool:
        nonlocal task
        task = daemon.request("GET", f"/v1/tasks/{result}")
        return task["state"] not in ("preparing",)

    until(settled, f"task {result} is prepared", daemon, timeout=120)
    return task


def container_image(container_id: str) -> str:
    return docker("inspect", "--format", "{{.Image}}", container_id)


def images_status(daemon: DaemonProcess) -> dict[str, Any]:
    status: dict[str, Any] = daemon.request("GET", "/v1/images")
    return status


# -- single flight ------------------------------------------------------------------


def test_sixteen_concurrent_tasks_cause_one_pull(
    make_daemon: Callable[..., DaemonProcess], images: TestImages, registry: LocalRegistry
) -> None:
    remote, image_id = images.pushed("app")
    repo = remote.split("/", 1)[1].rsplit(":", 1)[0]
    daemon = make_daemon()
    results = [f"flight_{n}-{RUN}" for n in range(16)]
    with ThreadPoolExecutor(len(results)) as pool:
        tasks = list(pool.map(lambda r: create(daemon, r, image=remote), results))
    assert {t["state"] for t in tasks} == {"created"}, tasks
    assert registry.pulls(repo) == 1
    assert {container_image(t["container_id"]) for t in tasks} == {image_id}
    # The pull's progress is in the log, layer by layer.
    events = [json.loads(line) for line in daemon.log_path.read_text().splitlines()]
    pulled = [e for e in events if e.get("event") == "image layer pulled"]
    assert pulled
    assert {e["image"] for e in pulled} == {remote}
    assert pulled[-1]["done"].startswith(f"pulling {remote}: ")
    assert {t["image"] for t in tasks} == {remote}
    item = next(i for i in images_status(daemon)["items"] if i["id"] == image_id)
    assert (item["pinned"], item["ours"], item["projects"]) == (True, True, [PROJECT])
    assert item["unique_bytes"] == LAYER  # the base layer is shared with the base image
    # Another task later: the image is here, no pull.
    assert create(daemon, f"flight_late-{RUN}", image=remote)["state"] == "created"
    assert registry.pulls(repo) == 1


# -- exact accounting ---------------------------------------------------------------


def assert_accounting_equals_df(daemon: DaemonProcess) -> None:
    """The daemon's total equals df's LayersSize, and every image's size and shared
    size equal df's, measured while the engine's image list stood still."""
    last: Any = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        before = {i["Id"] for i in engine_get("/images/json")}
        status = daemon.request("GET", "/v1/status")["images"]
        try:
            df = engine_get("/system/df")
        except DaemonError as exc:  # dockerd runs one df at a time
            last = exc.message
            time.sleep(0.2)
            continue
        after = {i["Id"] for i in engine_get("/images/json")}
        ours = {i["id"] for i in status["items"]}
        last = (status["total_bytes"], df["LayersSize"], len(ours), len(before))
        if before == after == ours == {i["Id"] for i in df["Images"]}:
            assert status["total_bytes"] == df["LayersSize"], last
            items = {i["id"]: i for i in status["items"]}
            for image in df["Images"]:
                item = items[image["Id"]]
                assert (item["size_bytes"], item["shared_bytes"]) == (
                    image["Size"],
                    image["SharedSize"],
                ), image["RepoTags"]
            return
        time.sleep(0.2)  # the daemon is still catching up, or others changed images
    raise AssertionError(f"accounting never matched a still engine; last {last}\n{daemon.log()}")


def test_accounting_equals_system_df_through_pulls_loads_builds_and_removals(
    make_daemon: Callable[..., DaemonProcess], images: TestImages
) -> None:
    daemon = make_daemon()
    assert_accounting_equals_df(daemon)

    pulled, pulled_id = images.pushed("pulled")
    assert create(daemon, f"acct_pull-{RUN}", image=pulled)["state"] == "created"
    assert_accounting_equals_df(daemon)

    # A `docker save` archive in the slot, of an image that is then removed here.
    saved, saved_id = images.build("saved")
    archive = slot(daemon, f"acct_load-{RUN}") / "image.tar"
    docker("save", "-o", str(archive), saved)
    docker("rmi", saved)
    task = create(daemon, f"acct_load-{RUN}", image_archive="image.tar")
    assert task["state"] == "created", task
    assert container_image(task["container_id"]) == saved_id
    assert_accounting_equals_df(daemon)

    build_slot = slot(daemon, f"acct_build-{RUN}")
    (build_slot / "Dockerfile").write_text(f"FROM {images.base}\nCOPY data /data\nENV X=1\n")
    (build_slot / "data").write_bytes(os.urandom(12_345))
    task = create(daemon, f"acct_build-{RUN}", build=True)
    assert task["state"] == "created", task
    built_id = container_image(task["container_id"])
    images.ids.append(built_id)
    assert_accounting_equals_df(daemon)
    built = next(i for i in images_status(daemon)["items"] if i["id"] == built_id)
    assert built["unique_bytes"] == 12_345
    assert built["ref"].startswith(f"boincd__{PROJECT}__")

    # Removals: the daemon's own (tasks gone, cache emptied), then a foreign one.
    for result in (f"acct_pull-{RUN}", f"acct_load-{RUN}", f"acct_build-{RUN}"):
        daemon.request("DELETE", f"/v1/tasks/{result}")
    until(lambda: not images_status(daemon)["containers"]["count"], "containers are gone", daemon)
    assert daemon.request("POST", "/v1/images/evict")["removed"] == []  # within budget
    report = daemon.request("POST", "/v1/images/evict?budget_bytes=0")
    assert {r["id"] for r in report["removed"]} == {pulled_id, saved_id, built_id}, (
        report,
        (pulled_id, saved_id, built_id),
        (daemon.base / "state" / "images.json").read_text(),
    )
    # Each frees its own layer; the base layer stays for the base image.
    assert report["freed_bytes"] == 2 * LAYER + 12_345
    assert not any(image_exists(i) for i in (pulled_id, saved_id, built_id))
    assert_accounting_equals_df(daemon)
    docker("rmi", images.base)
    assert_accounting_equals_df(daemon)

    out = subprocess.run(
        [sys.executable, "-m", "boincd_containers", "ctl", "status", "--json"],
        capture_output=True,
        text=True,
        env=daemon.env,
        timeout=60,
        check=True,
    )
    status = json.loads(out.stdout)
    assert set(status["images"]) >= {"total_bytes", "count", "items", "reclaimable_bytes"}
    assert set(status["volumes"]) == {"total_bytes", "count"}


# -- eviction -----------------------------------------------------------------------


def last_eviction(daemon: DaemonProcess) -> dict[str, Any] | None:
    report: dict[str, Any] | None = images_status(daemon)["last_eviction"]
    return report


def test_eviction_is_lru_never_takes_a_pinned_or_foreign_image(
    make_daemon: Callable[..., DaemonProcess], images: TestImages
) -> None:
    a, a_id = images.pushed("a")
    b, b_id = images.pushed("b")
    c, c_id = images.pushed("c")
    d, d_id = images.pushed("d")
    # The volunteer's own image, on the same base: never the daemon's to remove.
    _foreign, foreign_id = images.build("foreign", 500_000)
    base_size = int(docker("image", "inspect", "--format", "{{.Size}}", images.base))
    # Room for the base and two and a half app layers.
    daemon = make_daemon(image_cache_budget_bytes=base_size + 2 * LAYER + LAYER // 2)

    running = create(daemon, f"lru_a-{RUN}", image=a)
    assert daemon.request("POST", f"/v1/tasks/lru_a-{RUN}/start")["state"] == "running"
    assert create(daemon, f"lru_b-{RUN}", image=b)["state"] == "created"
    daemon.request("DELETE", f"/v1/tasks/lru_b-{RUN}")
    assert create(daemon, f"lru_c-{RUN}", image=c)["state"] == "created"
    # base + a + b + c is over budget: a is the oldest but its task runs, so b goes.
    until(lambda: not image_exists(b_id), "b is evicted", daemon)
    report = last_eviction(daemon)
    assert report is not None
    assert [(r["id"], r["freed_bytes"]) for r in report["removed"]] == [(b_id, LAYER)]
    assert all(image_exists(i) for i in (a_id, c_id, foreign_id))
    assert container_image(running["container_id"]) == a_id

    # c's task ends, then a's: a is now the more recently used, so d's pull evicts c.
    daemon.request("DELETE", f"/v1/tasks/lru_c-{RUN}")
    daemon.request("DELETE", f"/v1/tasks/lru_a-{RUN}")
    assert create(daemon, f"lru_d-{RUN}", image=d)["state"] == "created"
    until(lambda: not image_exists(c_id), "c is evicted", daemon)
    assert all(image_exists(i) for i in (a_id, d_id, foreign_id))
    report = last_eviction(daemon)
    assert report is not None
    assert [r["id"] for r in report["removed"]] == [c_id]
    assert report["freed_bytes"] == LAYER
    assert report["cache_bytes_after"] <= report["budget_bytes"]

    # Emptying the cache leaves the base layer (the foreign images use it) and
    # every foreign image alone.
    daemon.request("DELETE", f"/v1/tasks/lru_d-{RUN}")
    report = daemon.request("POST", "/v1/images/evict?budget_bytes=0")
    assert {r["id"] for r in report["removed"]} == {a_id, d_id}
    assert report["freed_bytes"] == 2 * LAYER
    assert image_exists(foreign_id)
    assert image_exists(images.base)
    assert not [i for i in images_status(daemon)["items"] if i["ours"]]


# -- dynamic updates ----------------------------------------------------------------


def test_a_moved_tag_reaches_new_tasks_while_running_ones_keep_theirs(
    make_daemon: Callable[..., DaemonProcess], images: TestImages, registry: LocalRegistry
) -> None:
    v1, v1_id = images.pushed("app", tag="v1", as_tag="latest")
    # An image the test pulls itself before the daemon uses it: not the daemon's.
    other, other_id = images.pushed("other")
    docker("pull", "-q", other)
    # Re-resolve tags at every task, and keep no unused image.
    daemon = make_daemon(tag_refresh_interval_s=0, image_cache_budget_bytes=0)

    old = create(daemon, f"tag_old-{RUN}", image=v1)
    assert daemon.request("POST", f"/v1/tasks/tag_old-{RUN}/start")["state"] == "running"
    _, v2_id = images.pushed("app", tag="v2", as_tag="latest")
    assert v2_id != v1_id
    new = create(daemon, f"tag_new-{RUN}", image=v1)  # the same reference, `...:latest`
    assert new["state"] == "created", new
    assert container_image(new["container_id"]) == v2_id
    assert container_image(old["container_id"]) == v1_id
    assert daemon.request("GET", f"/v1/tasks/tag_old-{RUN}")["state"] == "running"
    # Both are pinned: the eviction (budget 0) takes neither.
    report = daemon.request("POST", "/v1/images/evict")
    assert report["removed"] == []
    assert image_exists(v1_id)
    assert image_exists(v2_id)

    # After a crash and restart the pins come back from the containers.
    daemon.kill()
    daemon.start()
    until(lambda: images_status(daemon)["synced"], "the inventory is synced", daemon)
    pinned = {i["id"] for i in images_status(daemon)["items"] if i["pinned"]}
    assert {v1_id, v2_id} <= pinned
    assert daemon.request("POST", "/v1/images/evict")["removed"] == []

    # The old task ends: its image, no longer used by anyone, goes on its own.
    daemon.request("DELETE", f"/v1/tasks/tag_old-{RUN}")
    until(lambda: not image_exists(v1_id), "the old image is evicted", daemon)
    assert image_exists(v2_id)

    # The image the test pulled stays, even unused under a budget of 0.
    assert create(daemon, f"tag_other-{RUN}", image=other)["state"] == "created"
    daemon.request("DELETE", f"/v1/tasks/tag_other-{RUN}")
    daemon.request("DELETE", f"/v1/tasks/tag_new-{RUN}")
    until(lambda: not image_exists(v2_id), "the new image is evicted once unused", daemon)
    assert image_exists(other_id)
    daemon.request("POST", "/v1/images/evict")
    assert image_exists(other_id)


# -- errors -------------------------------------------------------------------------


def _auth_registry(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A registry that wants a login (htpasswd), on 127.0.0.1."""
    import socket
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # bcrypt, which the registry's htpasswd wants; stdlib until 3.13

    (workdir / "htpasswd").write_text(
        "user:" + crypt.crypt("secret", crypt.mksalt(crypt.METHOD_BLOWFISH)) + "\n"
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        host = f"127.0.0.1:{sock.getsockname()[1]}"
    (workdir / "config.yml").write_text(
        "version: 0.1\nlog:\n  level: error\n"
        f"storage:\n  filesystem:\n    rootdirectory: {workdir / 'storage'}\n"
        f"http:\n  addr: {host}\n"
        f"auth:\n  htpasswd:\n    realm: test\n    path: {workdir / 'htpasswd'}\n"
    )
    log = (workdir / "registry.log").open("wb")
    process = subprocess.Popen(
        ["docker-registry", "serve", str(workdir / "config.yml")], stdout=log, stderr=log
    )
    log.close()
    return process, host


def test_image_errors_are_clear_and_leave_nothing_behind(
    make_daemon: Callable[..., DaemonProcess],
    images: TestImages,
    registry: LocalRegistry,
    tmp_path: Path,
) -> None:
    auth_dir = tmp_path / "auth"
    auth_dir.mkdir()
    auth, auth_host = _auth_registry(auth_dir)
    try:
        daemon = make_daemon()
        until(lambda: auth.poll() is None and _answers(auth_host), "the registry answers", daemon)
        before = {i["Id"] for i in engine_get("/images/json?all=1")}

        unknown = create(
            daemon, f"err_unknown-{RUN}", image=registry.ref(f"{PREFIX}/none-{images.uid}")
        )
        assert (unknown["state"], unknown["error"]["code"]) == ("failed", "image_error")
        assert "no such image" in unknown["error"]["message"]
        assert unknown["error"]["retryable"] is False

        down = create(daemon, f"err_down-{RUN}", image=f"127.0.0.1:1/{PREFIX}/x:1")
        assert (down["state"], down["error"]["code"]) == ("waiting", "unavailable")
        assert "cannot be reached" in down["error"]["message"]
        assert down["error"]["retryable"] is True

        private = create(daemon, f"err_auth-{RUN}", image=f"{auth_host}/{PREFIX}/x:1")
        assert (private["state"], private["error"]["code"]) == ("failed", "image_error")
        assert "credentials" in private["error"]["message"]

        (slot(daemon, f"err_tar-{RUN}") / "image.tar").write_bytes(b"this is no image\n" * 1000)
        corrupt = create(daemon, f"err_tar-{RUN}", image_archive="image.tar")
        assert (corrupt["state"], corrupt["error"]["code"]) == ("failed", "image_error")
        assert "damaged" in corrupt["error"]["message"]

        # A build that fails after a step that worked: that step's image goes again.
        marker = f"marker-{images.uid}"
        build_slot = slot(daemon, f"err_build-{RUN}")
        (build_slot / "Dockerfile").write_text(
            f"FROM {images.base}\nCOPY data /{marker}\nRUN exit 3\n"
        )
        (build_slot / "data").write_bytes(b"x" * 1000)
        failed = create(daemon, f"err_build-{RUN}", build=True)
        assert (failed["state"], failed["error"]["code"]) == ("failed", "image_error")
        assert "returned a non-zero code: 3" in failed["error"]["message"]

        # No container for any of them, and no image of theirs left.
        owner = f"label=org.boinc.containers.owner={daemon.instance_id}"
        assert docker("ps", "-aq", "--filter", owner) == ""
        new = {i["Id"] for i in engine_get("/images/json?all=1")} - before
        for image_id in new:
            history = engine_get(f"/images/{image_id}/history")
            assert not any(marker in str(h.get("CreatedBy")) for h in history), history
        assert not [i for i in images_status(daemon)["items"] if i["ours"]]
    finally:
        auth.terminate()
        auth.wait(timeout=10)


def _answers(host: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"http://{host}/v2/", timeout=2)
    except urllib.error.HTTPError:
        return True  # 401: up, and wants a login
    except OSError:
        return False
    return True


def test_while_boinc_suspends_network_a_build_from_local_images_runs_without_it(
    make_daemon: Callable[..., DaemonProcess], images: TestImages
) -> None:
    daemon = make_daemon()
    local = slot(daemon, f"off_local-{RUN}")
    # The build's steps get no network: the interfaces a step saw are in the image.
    (local / "Dockerfile").write_text(
        f"FROM {images.base}\nRUN grep -o '^ *[a-z0-9]*:' /proc/net/dev | tr -d ' :' > /net\n"
    )
    built = create(daemon, f"off_local-{RUN}", build=True, allow_fetch=False)
    assert built["state"] == "created", built
    net = docker("run", "--rm", "--network", "none", built["image_id"], "cat", "/net")
    assert net.split() == ["lo"]  # no eth0: no network
    absent = slot(daemon, f"off_absent-{RUN}")
    (absent / "Dockerfile").write_text(f"FROM 127.0.0.1:1/{PREFIX}/not-here:1\n")
    waiting = create(daemon, f"off_absent-{RUN}", build=True, allow_fetch=False)
    assert (waiting["state"], waiting["error"]["code"]) == ("waiting", "network_suspended")
    assert "not here" in waiting["error"]["message"]
