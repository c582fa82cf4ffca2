"""An in-memory engine shaped as the real one (engine/adapter.py): one object per
resource (`containers`, `images`, `volumes`, `networks`, `events`), each with
the real one's verbs, for lifecycle logic tests.

It mimics the Engine API's observable behaviour (states, name conflicts, 404s),
not its implementation; real-engine tests cover the rest. Each resource keeps
its objects (`containers.by_id`, `images.by_ref`, `volumes.by_name`) for tests
to look at and change; test subclasses override a resource by subclassing it
and setting it on their engine. engine/protocols.py says what each component
uses, and mypy checks these fakes against it (testing/conformance.py).
"""

from __future__ import annotations

import asyncio
import builtins
import itertools
from collections.abc import AsyncIterator
from typing import Any

from boincd_containers.core.errors import Conflict, ImageError, NotFound, Unavailable
from boincd_containers.engine.info import EngineInfo

JSON = dict[str, Any]
# A list of engine objects. An alias: in the resource classes `list` is a verb.
JSONList = list[JSON]

_ids = itertools.count(1)


class FakeResource:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine

    def _check(self) -> None:
        self.engine.check()


class FakeContainers(FakeResource):
    def __init__(self, engine: FakeEngine) -> None:
        super().__init__(engine)
        self.by_id: dict[str, JSON] = {}  # inspect data

    def get(self, ref: str) -> JSON:
        """Test control: a container's inspect data by id, id prefix or name."""
        for cid, data in self.by_id.items():
            if cid == ref or cid.startswith(ref) or data["Name"] == "/" + ref:
                return data
        raise NotFound(f"no such container: {ref}")

    def _emit(self, data: JSON, action: str) -> None:
        attributes = dict(data["Config"]["Labels"])
        self.engine.events_queue.put_nowait(
            {
                "Type": "container",
                "Action": action,
                "Actor": {"ID": data["Id"], "Attributes": attributes},
            }
        )

    def set_state(self, ref: str, status: str, action: str, exit_code: int = 0) -> None:
        data = self.get(ref)
        data["State"].update(
            Status=status,
            Running=status in ("running", "paused"),
            Paused=status == "paused",
            Pid=4242 if status in ("running", "paused") else 0,
            ExitCode=exit_code,
        )
        self._emit(data, action)

    async def create(self, name: str, config: JSON) -> str:
        self._check()
        self.engine.calls.append(("create", name))
        if any(d["Name"] == "/" + name for d in self.by_id.values()):
            raise Conflict(f'the container name "/{name}" is already in use')
        # By reference or by id, as the engines do.
        image = self.engine.images.get(config["Image"])
        cid = f"{next(_ids):064x}"
        self.by_id[cid] = {
            "Id": cid,
            "Name": "/" + name,
            "Image": image["Id"],
            "Config": {"Labels": dict(config.get("Labels") or {}), "Image": config["Image"]},
            "HostConfig": config.get("HostConfig", {}),
            "State": {
                "Status": "created",
                "Running": False,
                "Paused": False,
                "Pid": 0,
                "ExitCode": 0,
            },
            "NetworkSettings": {"Networks": {config["HostConfig"].get("NetworkMode", "none"): {}}},
        }
        self._emit(self.by_id[cid], "create")
        return cid

    async def inspect(self, ref: str, *, size: bool = False) -> JSON:
        self._check()
        return self.get(ref)

    async def list(self, labels: dict[str, str], *, size: bool = False) -> JSONList:
        self._check()
        return [
            {"Id": d["Id"], "Labels": d["Config"]["Labels"], "ImageID": d["Image"]}
            for d in self.by_id.values()
            if all(d["Config"]["Labels"].get(k) == v for k, v in labels.items())
        ]

    async def rename(self, ref: str, name: str) -> None:
        self._check()
        if any(d["Name"] == "/" + name for d in self.by_id.values()):
            raise Conflict(f'the container name "/{name}" is already in use')
        self.get(ref)["Name"] = "/" + name

    async def start(self, ref: str) -> None:
        self._check()
        self.engine.calls.append(("start", ref))
        self.set_state(ref, "running", "start")

    async def pause(self, ref: str) -> None:
        self._check()
        self.engine.calls.append(("pause", ref))
        self.set_state(ref, "paused", "pause")

    async def unpause(self, ref: str) -> None:
        self._check()
        self.engine.calls.append(("unpause", ref))
        self.set_state(ref, "running", "unpause")

    async def kill(self, ref: str, signal: str = "KILL") -> None:
        self._check()
        self.set_state(ref, "exited", "die", 137)

    async def remove(self, ref: str) -> None:
        self._check()
        self.engine.calls.append(("remove", ref))
        try:
            data = self.get(ref)
        except NotFound:
            return
        del self.by_id[data["Id"]]
        self._emit(data, "destroy")


class FakeImages(FakeResource):
    def __init__(self, engine: FakeEngine) -> None:
        super().__init__(engine)
        self.by_ref: dict[str, JSON] = {"boincd-test/busybox:latest": {"Id": "sha256:b"}}

    def get(self, ref: str) -> JSON:
        """Test control: an image's inspect data by reference or id."""
        if ref in self.by_ref:
            return self.by_ref[ref]
        for image in self.by_ref.values():
            if image["Id"] == ref:
                return image
        raise NotFound(f"no such image: {ref}")

    async def inspect(self, ref: str) -> JSON:
        self._check()
        return self.get(ref)

    async def pull(self, ref: str, progress: Any = None) -> None:
        self._check()
        self.engine.calls.append(("pull", ref))
        await asyncio.sleep(self.engine.pull_delay)
        if ref.startswith("missing/"):
            raise ImageError(f"pull {ref}: manifest unknown")
        self.by_ref[ref] = {"Id": f"sha256:{len(self.by_ref):064x}"}

    async def history(self, ref: str) -> JSONList:
        self._check()
        self.get(ref)
        return []

    async def list(self, labels: dict[str, str] | None = None) -> JSONList:
        self._check()
        ids: dict[str, builtins.list[str]] = {}
        for ref, data in self.by_ref.items():
            if all((data.get("Labels") or {}).get(k) == v for k, v in (labels or {}).items()):
                ids.setdefault(str(data["Id"]), []).append(ref)
        return [{"Id": i, "RepoTags": refs} for i, refs in ids.items()]

    async def tag(self, ref: str, new_ref: str) -> None:
        self._check()
        self.engine.calls.append(("tag", new_ref))
        self.by_ref[new_ref] = self.get(ref)

    async def remove(self, ref: str) -> JSONList:
        """An untag while other names are left; else a delete, refused while a
        container uses the image."""
        self._check()
        self.engine.calls.append(("rmi", ref))
        try:
            data = self.get(ref)
        except NotFound:
            return []
        names = [r for r, d in self.by_ref.items() if d is data]
        if ref in self.by_ref and len(names) > 1:
            del self.by_ref[ref]
            return [{"Untagged": ref}]
        if any(c["Image"] == data["Id"] for c in self.engine.containers.by_id.values()):
            raise Conflict(f"conflict: unable to delete {ref[:19]} - image is being used")
        for name in names:
            del self.by_ref[name]
        return [{"Deleted": data["Id"]}]

    async def load(
        self, tarball: Any, progress: Any = None, *, name: str | None = None
    ) -> builtins.list[str]:
        self._check()
        self.engine.calls.append(("load", name or str(tarball)))
        raise ImageError("load: not supported by the fake")

    async def build(
        self,
        context_tar: Any,
        tag: str,
        labels: dict[str, str],
        buildargs: dict[str, str],
        progress: Any = None,
        *,
        network: bool = True,
    ) -> None:
        self._check()
        self.engine.calls.append(("build", tag))
        raise ImageError(f"build {tag}: not supported by the fake (testing.fake_images is)")


class FakeVolumes(FakeResource):
    def __init__(self, engine: FakeEngine) -> None:
        super().__init__(engine)
        self.by_name: dict[str, JSON] = {}  # inspect data

    async def list(self, labels: dict[str, str]) -> JSONList:
        self._check()
        return [
            v
            for v in self.by_name.values()
            if all((v.get("Labels") or {}).get(k) == val for k, val in labels.items())
        ]

    async def inspect(self, name: str) -> JSON:
        self._check()
        if name not in self.by_name:
            raise NotFound(f"no such volume: {name}")
        return self.by_name[name]

    async def remove(self, name: str) -> None:
        self._check()
        self.engine.calls.append(("remove_volume", name))
        containers = self.engine.containers.by_id.values()
        if any(m.get("Name") == name for c in containers for m in c.get("Mounts", [])):
            raise Conflict(f"remove {name}: volume is in use")
        self.by_name.pop(name, None)


class FakeNetworks(FakeResource):
    async def connect(self, network: str, ref: str) -> None:
        self._check()
        self.engine.containers.get(ref)["NetworkSettings"]["Networks"][network] = {}

    async def disconnect(self, network: str, ref: str) -> None:
        self._check()
        self.engine.containers.get(ref)["NetworkSettings"]["Networks"].pop(network, None)


class FakeEvents(FakeResource):
    async def follow(
        self, labels: dict[str, str], since: float | None = None
    ) -> AsyncIterator[JSON]:
        self._check()
        while True:
            event = await self.engine.events_queue.get()
            if self.engine.down:
                raise Unavailable("fake engine went down")
            yield event

    async def follow_images(self, since: float | None = None) -> AsyncIterator[JSON]:
        self._check()
        while True:
            yield await self.engine.image_events_queue.get()


class FakeEngine:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.events_queue: asyncio.Queue[JSON] = asyncio.Queue()
        self.image_events_queue: asyncio.Queue[JSON] = asyncio.Queue()
        self.down = False
        self.pull_delay = 0.0
        self.host = "fake://"
        self.info: EngineInfo | None = None
        self.containers = FakeContainers(self)
        self.images = FakeImages(self)
        self.volumes = FakeVolumes(self)
        self.networks = FakeNetworks(self)
        self.events = FakeEvents(self)

    def check(self) -> None:
        if self.down:
            raise Unavailable("fake engine is down")

    def exit(self, ref: str, code: int) -> None:
        """Test control: the container's process ends with `code`."""
        self.containers.set_state(ref, "exited", "die", code)

    async def connect(self) -> EngineInfo:
        self.check()
        self.info = EngineInfo("docker", "fake", "1.41", False, "1", "cgroupfs", self.host, "/")
        return self.info

    async def system_df(self) -> JSON:
        self.check()
        return {"Images": [], "Containers": [], "Volumes": [], "BuildCache": []}

    async def reset(self) -> None:
        pass

    async def close(self) -> None:
        pass
