"""images/accounting.py against real engines: fed with Engine API data only, its total
equals Docker's `/system/df` LayersSize to the byte, and each image's size and
shared size equal df's, through builds (with empty and zero-size layers),
imports, loads (with and without history) and removals. On Podman, whose df
says LayersSize 0, the total equals the sum of its storage's layer sizes.

Other engineers use the same engines at the same time, so every comparison
covers all images in the engine, not only ours, and is retried when the image
list changed while it was measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import shutil
import tarfile
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from boincd_containers.images.accounting import (
    FROM_IMAGE_SIZE,
    DiskAccount,
    ImageData,
    normalize_id,
)
from boincd_containers.testing.daemon import TEST_IMAGE, DaemonProcess
from boincd_containers.testing.daemon import docker as docker_cli
from boincd_containers.testing.local_registry import busybox_rootfs_tar

PREFIX = "boincd-acct-test"


def _tar(files: Mapping[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Engine:
    """Just enough of the Engine API over its Unix socket for these tests."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        self.created: list[str] = []

    async def get(self, path: str, **params: str) -> Any:
        async with self.session.get(path, params=params) as resp:
            if resp.status != 200:
                raise RuntimeError(f"GET {path}: {resp.status} {await resp.text()}")
            return await resp.json()

    async def _stream(self, path: str, body: bytes, **params: str) -> list[dict[str, Any]]:
        headers = {"Content-Type": "application/x-tar"}
        data = io.BytesIO(body)  # aiohttp warns that big raw bytes block the loop
        async with self.session.post(path, data=data, params=params, headers=headers) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise RuntimeError(f"POST {path}: {resp.status} {text}")
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line or "errorDetail" in line]
        if errors:
            raise RuntimeError(f"POST {path}: {errors}")
        return lines

    async def import_image(self, ref: str, rootfs: bytes) -> None:
        repo, tag = ref.rsplit(":", 1)
        self.created.append(ref)
        await self._stream("/images/create", rootfs, fromSrc="-", repo=repo, tag=tag)

    async def build(self, ref: str, dockerfile: str, files: Mapping[str, bytes]) -> None:
        context = _tar({"Dockerfile": dockerfile.encode(), **files})
        self.created.append(ref)
        await self._stream("/build", context, t=ref, rm="1", forcerm="1")

    async def save(self, ref: str) -> bytes:
        async with self.session.get("/images/get", params={"names": ref}) as resp:
            resp.raise_for_status()
            return await resp.read()

    async def load(self, archive: bytes, refs: Iterable[str]) -> None:
        self.created.extend(refs)
        await self._stream("/images/load", archive, quiet="1")

    async def remove(self, ref: str) -> None:
        async with self.session.delete(f"/images/{ref}") as resp:
            if resp.status not in (200, 404):
                raise RuntimeError(f"DELETE {ref}: {resp.status} {await resp.text()}")

    async def cleanup(self) -> None:
        # Newest first: images built on others go before their bases.
        for ref in reversed(self.created):
            await self.remove(ref)

    async def image_data(self, image_id: str) -> ImageData:
        inspect = await self.get(f"/images/{image_id}/json")
        history = await self.get(f"/images/{image_id}/history")
        return ImageData.from_api(inspect, history)

    async def image_ids(self) -> set[str]:
        return {normalize_id(i["Id"]) for i in await self.get("/images/json")}


@pytest.fixture
async def docker(docker_engine: str) -> AsyncIterator[Engine]:
    sock = os.environ.get("DOCKER_HOST", docker_engine).removeprefix("unix://")
    connector = aiohttp.UnixConnector(path=sock)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession("http://docker", connector=connector, timeout=timeout) as s:
        engine = Engine(s)
        try:
            yield engine
        finally:
            await engine.cleanup()


async def sync_account(engine: Engine, account: DiskAccount) -> None:
    """Follow the engine as the daemon does on events: add new, drop gone."""
    ids = await engine.image_ids()
    known = {r.id for r in account.images()}
    for gone in known - ids:
        account.remove_image(gone)
    for new in ids - known:
        try:
            account.add_image(await engine.image_data(new))
        except RuntimeError:
            continue  # removed by someone else meanwhile; the next sync drops it


async def assert_matches_df(engine: Engine, account: DiskAccount) -> None:
    """Incremental and full accounts both equal df, image by image."""
    last: tuple[int, int, int] | None = None
    for _ in range(10):
        await sync_account(engine, account)
        before = await engine.image_ids()
        full = DiskAccount.from_images([(await engine.image_data(i), ()) for i in sorted(before)])
        try:
            df = await engine.get("/system/df")
        except RuntimeError as exc:
            if "already running" not in str(exc):
                raise
            await asyncio.sleep(0.2)  # another df in flight: dockerd runs one at a time
            continue
        after = await engine.image_ids()
        df_ids = {normalize_id(i["Id"]) for i in df["Images"]}
        if not before == after == df_ids == {r.id for r in account.images()}:
            continue  # someone else changed the images meanwhile: measure again
        last = (account.total_bytes, full.total_bytes, df["LayersSize"])
        assert account.total_bytes == full.total_bytes == df["LayersSize"], last
        for image in df["Images"]:
            usage = account.image_usage(image["Id"])
            assert (usage.size_bytes, usage.shared_bytes) == (image["Size"], image["SharedSize"])
        return
    pytest.fail(f"the engine's images kept changing; last totals {last}")


@pytest.mark.docker
async def test_docker_total_equals_df_layers_size(docker: Engine) -> None:
    uid = uuid.uuid4().hex[:12]
    base, other = f"{PREFIX}/base-{uid}:1", f"{PREFIX}/imported-{uid}:1"
    app1, app2, app3 = (f"{PREFIX}/app{n}-{uid}:1" for n in (1, 2, 3))
    account = DiskAccount()

    await docker.import_image(base, busybox_rootfs_tar(uid))
    await docker.import_image(other, busybox_rootfs_tar(uid + "-other"))
    await assert_matches_df(docker, account)

    # ENV/LABEL make empty layers; `mkdir` a real layer of size 0, and `rm` one
    # of whiteouts only, placed where only the instruction text tells them apart.
    await docker.build(
        app1,
        f"FROM {base}\nENV A=1\nCOPY f1 /f1\nLABEL x=y\nRUN mkdir /d1\nRUN echo {uid} > /h\n",
        {"f1": os.urandom(100_000)},
    )
    await docker.build(
        app2,
        f"FROM {base}\nLABEL x=z\nCOPY f2 /f2\nENV B=2\nRUN rm /bin/true\n",
        {"f2": os.urandom(5_000)},
    )
    await docker.build(app3, f"FROM {app1}\nCOPY f3 /f3\n", {"f3": os.urandom(3_000)})
    await assert_matches_df(docker, account)
    ours = {r.ref: r for r in account.images() if r.ref.startswith(PREFIX)}
    # app3 shares base, app1's layers; only its own COPY is unique.
    assert ours[app3].unique_bytes == 3_000
    assert ours[app1].shared_bytes == ours[base].size_bytes + 100_000 + 0 + len(uid) + 1

    # Saved, removed, loaded back: the same image, the same accounting.
    archive = await docker.save(app3)
    await docker.remove(app3)
    await assert_matches_df(docker, account)
    await docker.load(archive, [app3])
    await assert_matches_df(docker, account)

    # A loaded image whose config has no history: the image-size fallback.
    bare = f"{PREFIX}/bare-{uid}:1"
    await docker.load(bare_archive(await docker.save(base), bare, uid), [bare])
    await assert_matches_df(docker, account)
    bare_record = account.record(next(r.id for r in account.images() if r.ref == bare))
    assert bare_record is not None
    assert bare_record.sizes_from == FROM_IMAGE_SIZE

    # Untagging a base that has children leaves it behind as a hidden parent,
    # which df no longer lists; removing everything else follows.
    await docker.remove(base)
    await assert_matches_df(docker, account)
    for ref in (app1, bare, other):
        await docker.remove(ref)
        await assert_matches_df(docker, account)


def bare_archive(saved_base: bytes, ref: str, uid: str) -> bytes:
    """A `docker load` archive: base's layer plus a new one, no history at all."""
    with tarfile.open(fileobj=io.BytesIO(saved_base)) as tar:
        manifest = json.load(_member(tar, "manifest.json"))[0]
        base_layer = _member(tar, manifest["Layers"][0]).read()
    top_layer = _tar({"extra": f"{uid}\n".encode() * 1000})
    layers = [base_layer, top_layer]
    diff_ids = ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    names = [f"l{n}/layer.tar" for n in range(len(layers))]
    files = dict(zip(names, layers, strict=True))
    files["config.json"] = config
    files["manifest.json"] = json.dumps(
        [{"Config": "config.json", "RepoTags": [ref], "Layers": names}]
    ).encode()
    return _tar(files)


def _member(tar: tarfile.TarFile, name: str) -> io.BufferedReader:
    member = tar.extractfile(name)
    assert member is not None
    return member  # type: ignore[return-value]


# Podman: same function, its own measure of truth.


async def _podman(*args: str, stdin: bytes | None = None) -> str:
    proc = await asyncio.create_subprocess_exec(
        "podman",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)}: {err.decode().strip()}")
    return out.decode().strip()


@pytest.fixture
async def podman(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Engine]:
    if shutil.which("podman") is None or os.geteuid() != 0:
        pytest.skip("needs rootful podman")
    sock = Path(tmp_path_factory.mktemp("podman", numbered=True)) / "api.sock"
    service = await asyncio.create_subprocess_exec(
        "podman", "system", "service", "--time=0", f"unix://{sock}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    created: list[str] = []
    try:
        for _ in range(600):  # the service takes a moment to listen
            if sock.exists() or service.returncode is not None:
                break
            await asyncio.sleep(0.05)
        connector = aiohttp.UnixConnector(path=str(sock))
        async with aiohttp.ClientSession("http://podman", connector=connector) as session:
            engine = Engine(session)
            engine.created = created
            await engine.get("/version")
            yield engine
    finally:
        for ref in reversed(created):
            with contextlib.suppress(RuntimeError):  # already gone
                await _podman("rmi", ref)
        service.terminate()
        await service.wait()


def _podman_storage_total(graph_root: Path, image_ids: set[str]) -> int:
    """Sum of `diff-size` (the uncompressed layer size) over the storage
    layers of the given images, each once, from Podman's own storage files."""
    images = json.loads((graph_root / "overlay-images" / "images.json").read_text())
    top_layers = {i["layer"] for i in images if normalize_id(i["id"]) in image_ids}
    layers = json.loads((graph_root / "overlay-layers" / "layers.json").read_text())
    by_id = {layer["id"]: layer for layer in layers}
    seen: set[str] = set()
    for top in top_layers:
        layer_id: str | None = top
        while layer_id and layer_id not in seen:
            seen.add(layer_id)
            layer_id = by_id[layer_id].get("parent")
    return sum(int(by_id[i].get("diff-size", 0)) for i in seen)


@pytest.mark.podman
async def test_podman_total_equals_storage_layer_sizes(podman: Engine, tmp_path: Path) -> None:
    uid = uuid.uuid4().hex[:12]
    base, app = f"localhost/{PREFIX}/base-{uid}:1", f"localhost/{PREFIX}/app-{uid}:1"
    (tmp_path / "rootfs.tar").write_bytes(busybox_rootfs_tar(uid))
    podman.created.append(base)
    await _podman("import", "-q", str(tmp_path / "rootfs.tar"), base)
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "f1").write_bytes(os.urandom(50_000))
    (tmp_path / "ctx" / "Dockerfile").write_text(
        f"FROM {base}\nENV A=1\nCOPY f1 /f1\nLABEL x=y\nRUN mkdir /d1\nRUN rm /bin/true\n"
    )
    podman.created.append(app)
    await _podman("build", "-q", "-t", app, str(tmp_path / "ctx"))

    graph_root = Path(await _podman("info", "--format", "{{.Store.GraphRoot}}"))
    for _ in range(10):
        before = await podman.image_ids()
        account = DiskAccount.from_images([(await podman.image_data(i), ()) for i in before])
        total = _podman_storage_total(graph_root, before)
        if before != await podman.image_ids():
            continue
        assert account.total_bytes == total
        assert all(r.sizes_from != FROM_IMAGE_SIZE for r in account.images())
        df = await podman.get("/system/df")
        assert df["LayersSize"] == 0  # why we compute it ourselves
        return
    pytest.fail("podman's images kept changing")


@pytest.mark.docker
def test_a_stopped_task_container_shows_its_final_writable_layer(
    daemon: DaemonProcess, short_tmp: Path
) -> None:
    """The daemon measures a container again when it exits, so `ctl status` says
    what df says of its writable layer at once, not at the next minute's list."""
    result = f"acct_rw_{uuid.uuid4().hex[:8]}"
    slot = short_tmp / result
    slot.mkdir()
    daemon.request(
        "POST",
        "/v1/tasks",
        {
            "result": result,
            "project": "test.example.org_acct",
            "slot_dir": str(slot),
            "image": TEST_IMAGE,
            # /tmp is in the image, not a tmpfs: 192 KiB into the container's own layer.
            "command": ["sh", "-c", "dd if=/dev/zero of=/tmp/out bs=65536 count=3; sleep 1"],
            "memory_bytes": 64 * 2**20,
        },
    )
    daemon.wait_task(result, {"created"})
    task = daemon.request("POST", f"/v1/tasks/{result}/start")
    daemon.wait_task(result, {"exited"})
    size_rw = json.loads(docker_cli("inspect", "--size", task["container_id"]))[0]["SizeRw"]
    assert size_rw >= 3 * 65536
    # Well within the minute of the periodic measurement (the benchmark times it).
    # The daemon is this test's own: its containers are this one.
    deadline = time.monotonic() + 15
    while True:
        containers = daemon.request("GET", "/v1/status")["containers"]
        if containers["writable_bytes"] == size_rw or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert containers == {"writable_bytes": size_rw, "count": 1}
    daemon.request("DELETE", f"/v1/tasks/{result}")
