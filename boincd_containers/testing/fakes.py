"""An in-memory engine with the adapter's verbs, for lifecycle logic tests.

It mimics the Engine API's observable behaviour (states, name conflicts, 404s),
not its implementation; real-engine tests cover the rest.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

from boincd_containers.core.errors import Conflict, NotFound, Unavailable
from boincd_containers.engine.adapter import EngineInfo

_ids = itertools.count(1)


class FakeEngine:
    def __init__(self) -> None:
        self.containers: dict[str, dict[str, Any]] = {}
        self.images: dict[str, dict[str, Any]] = {"boincd-test/busybox:latest": {"Id": "sha256:b"}}
        self.calls: list[tuple[str, str]] = []
        self.events_queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.down = False
        self.pull_delay = 0.0
        self.host = "fake://"
        self.info: EngineInfo | None = None

    def _check(self) -> None:
        if self.down:
            raise Unavailable("fake engine is down")

    def _get(self, ref: str) -> dict[str, Any]:
        for cid, data in self.containers.items():
            if cid == ref or cid.startswith(ref) or data["Name"] == "/" + ref:
                return data
        raise NotFound(f"no such container: {ref}")

    def _emit(self, data: dict[str, Any], action: str) -> None:
        attributes = dict(data["Config"]["Labels"])
        self.events_queue.put_nowait(
            {
                "Type": "container",
                "Action": action,
                "Actor": {"ID": data["Id"], "Attributes": attributes},
            }
        )

    async def connect(self) -> EngineInfo:
        self._check()
        self.info = EngineInfo("docker", "fake", "1.41", False, "1", "cgroupfs", self.host, "/")
        return self.info

    async def reset(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def create_container(self, name: str, config: dict[str, Any]) -> str:
        self._check()
        self.calls.append(("create", name))
        if any(d["Name"] == "/" + name for d in self.containers.values()):
            raise Conflict(f'the container name "/{name}" is already in use')
        image = self._image(config["Image"])  # by reference or by id, as the engines do
        cid = f"{next(_ids):064x}"
        self.containers[cid] = {
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
        self._emit(self.containers[cid], "create")
        return cid

    async def inspect_container(self, ref: str, *, size: bool = False) -> dict[str, Any]:
        self._check()
        return self._get(ref)

    async def list_containers(
        self, labels: dict[str, str], *, size: bool = False
    ) -> list[dict[str, Any]]:
        self._check()
        return [
            {"Id": d["Id"], "Labels": d["Config"]["Labels"], "ImageID": d["Image"]}
            for d in self.containers.values()
            if all(d["Config"]["Labels"].get(k) == v for k, v in labels.items())
        ]

    def _set(self, ref: str, status: str, action: str, exit_code: int = 0) -> None:
        data = self._get(ref)
        data["State"].update(
            Status=status,
            Running=status in ("running", "paused"),
            Paused=status == "paused",
            Pid=4242 if status in ("running", "paused") else 0,
            ExitCode=exit_code,
        )
        self._emit(data, action)

    async def start_container(self, ref: str) -> None:
        self._check()
        self.calls.append(("start", ref))
        self._set(ref, "running", "start")

    async def pause_container(self, ref: str) -> None:
        self._check()
        self.calls.append(("pause", ref))
        self._set(ref, "paused", "pause")

    async def unpause_container(self, ref: str) -> None:
        self._check()
        self.calls.append(("unpause", ref))
        self._set(ref, "running", "unpause")

    def exit(self, ref: str, code: int) -> None:
        """Test control: the container's process ends with `code`."""
        self._set(ref, "exited", "die", code)

    async def kill_container(self, ref: str, signal: str = "KILL") -> None:
        self._check()
        self._set(ref, "exited", "die", 137)

    async def remove_container(self, ref: str) -> None:
        self._check()
        self.calls.append(("remove", ref))
        try:
            data = self._get(ref)
        except NotFound:
            return
        del self.containers[data["Id"]]
        self._emit(data, "destroy")

    async def connect_network(self, network: str, ref: str) -> None:
        self._check()
        self._get(ref)["NetworkSettings"]["Networks"][network] = {}

    async def disconnect_network(self, network: str, ref: str) -> None:
        self._check()
        self._get(ref)["NetworkSettings"]["Networks"].pop(network, None)

    def _image(self, ref: str) -> dict[str, Any]:
        if ref in self.images:
            return self.images[ref]
        for image in self.images.values():
            if image["Id"] == ref:
                return image
        raise NotFound(f"no such image: {ref}")

    async def inspect_image(self, ref: str) -> dict[str, Any]:
        self._check()
        return self._image(ref)

    async def pull_image(self, ref: str, progress: Any = None) -> None:
        self._check()
        self.calls.append(("pull", ref))
        await asyncio.sleep(self.pull_delay)
        if ref.startswith("missing/"):
            from boincd_containers.core.errors import ImageError

            raise ImageError(f"pull {ref}: manifest unknown")
        self.images[ref] = {"Id": f"sha256:{len(self.images):064x}"}

    async def events(
        self, labels: dict[str, str], since: float | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        self._check()
        while True:
            event = await self.events_queue.get()
            if self.down:
                raise Unavailable("fake engine went down")
            yield event
