"""A fake engine with an image store (layers, tags, history) and a fake registry,
for the image cache and inventory logic. It mimics what Docker shows through the
API (ids, RepoTags, RootFS layers, per-layer history sizes, 409 for an image a
container uses), not how Docker stores things; real-engine tests cover that."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from boincd_containers.core.errors import BoincdError, Conflict, ImageError, NotFound
from boincd_containers.testing.fakes import FakeEngine

Layer = tuple[str, int]  # (content name, size): same name, same diff id


def layer(name: str, size: int) -> Layer:
    return (name, size)


def _digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


class ImageEngine(FakeEngine):
    def __init__(self) -> None:
        super().__init__()
        self.store: dict[str, dict[str, Any]] = {}  # id -> inspect data (+ "_sizes")
        self.images = {}  # ref -> inspect data, for FakeEngine's lookups
        self.remote: dict[str, tuple[list[Layer], dict[str, str]]] = {}
        self.pull_errors: dict[str, BoincdError] = {}
        self.pulls: list[str] = []
        self.image_events_queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.volumes: list[dict[str, Any]] = []
        self.build_fails_at: int | None = None  # step number whose RUN fails
        self.build_networks: list[bool] = []  # network of each build (False: BOINC off)
        self.offline_fails = False
        self.sizes_rw: dict[str, int] = {}  # container id -> bytes its layer holds
        self.size_calls: list[str] = []  # "list" or the container id inspected with size
        self.add_image("boincd-test/busybox:latest", [layer("busybox", 2_000_000)])

    # -- test controls --------------------------------------------------------------

    def make(self, layers: Sequence[Layer], labels: dict[str, str] | None = None) -> dict[str, Any]:
        diff_ids = [_digest(name) for name, _ in layers]
        image_id = _digest("config:" + ",".join(diff_ids) + repr(sorted((labels or {}).items())))
        return {
            "Id": image_id,
            "RepoTags": [],
            "RootFS": {"Type": "layers", "Layers": diff_ids},
            "Size": sum(size for _, size in layers),
            "Config": {"Labels": dict(labels or {})},
            "_sizes": [size for _, size in layers],
        }

    def add_image(
        self, ref: str | None, layers: Sequence[Layer], labels: dict[str, str] | None = None
    ) -> str:
        """An image that is simply there (the volunteer's, or preloaded)."""
        data = self.make(layers, labels)
        data = self.store.setdefault(data["Id"], data)
        if ref:
            self._tag(data["Id"], ref)
        self._event("pull" if ref else "load", data["Id"])
        return str(data["Id"])

    def push(self, ref: str, layers: Sequence[Layer]) -> None:
        """What pulling `ref` brings from now on."""
        self.remote[ref] = (list(layers), {})

    def _tag(self, image_id: str, ref: str) -> None:
        old = self.images.get(ref)
        if old is not None and old["Id"] != image_id:
            old["RepoTags"].remove(ref)
        data = self.store[image_id]
        if ref not in data["RepoTags"]:
            data["RepoTags"].append(ref)
        self.images[ref] = data

    def _event(self, action: str, actor: str) -> None:
        self.image_events_queue.put_nowait(
            {"Type": "image", "Action": action, "Actor": {"ID": actor, "Attributes": {}}}
        )

    def _image(self, ref: str) -> dict[str, Any]:
        if ref in self.images:
            return self.images[ref]
        if ref in self.store:
            return self.store[ref]
        for image_id, data in self.store.items():  # a short id, as build output gives
            if len(ref) >= 12 and image_id[7:].startswith(ref):
                return data
        raise NotFound(f"no such image: {ref}")

    # -- engine verbs -----------------------------------------------------------------

    async def inspect_image(self, ref: str) -> dict[str, Any]:
        self._check()
        data = self._image(ref)
        return {k: v for k, v in data.items() if not k.startswith("_")}

    async def image_history(self, ref: str) -> list[dict[str, Any]]:
        self._check()
        data = self._image(ref)
        return [{"Size": s, "CreatedBy": "ADD layer"} for s in reversed(data["_sizes"])]

    async def list_images(self) -> list[dict[str, Any]]:
        self._check()
        return [
            {"Id": i, "RepoTags": list(d["RepoTags"]) or ["<none>:<none>"], "Size": d["Size"]}
            for i, d in self.store.items()
            if not d.get("_hidden")
        ]

    async def pull_image(self, ref: str, progress: Any = None) -> None:
        self._check()
        self.calls.append(("pull", ref))
        self.pulls.append(ref)
        await asyncio.sleep(self.pull_delay)
        if ref in self.pull_errors:
            raise self.pull_errors[ref]
        if ref not in self.remote:
            raise ImageError(f"pull {ref}: manifest unknown")
        layers, labels = self.remote[ref]
        if progress is not None:
            for name, _size in layers:
                progress({"status": "Pulling fs layer", "id": name})
            for name, size in layers:
                progress(
                    {
                        "status": "Downloading",
                        "id": name,
                        "progressDetail": {"current": size // 2, "total": size},
                    }
                )
                progress({"status": "Pull complete", "id": name})
        data = self.make(layers, labels)
        self.store.setdefault(data["Id"], data)
        self._tag(data["Id"], ref)
        self._event("pull", ref)

    async def remove_image(self, ref: str) -> list[dict[str, Any]]:
        self._check()
        self.calls.append(("rmi", ref))
        try:
            data = self._image(ref)
        except NotFound:
            return []
        if any(c["Image"] == data["Id"] for c in self.containers.values()):
            raise Conflict(f"conflict: unable to delete {ref[:19]} - image is being used")
        del self.store[data["Id"]]
        for tag in data["RepoTags"]:
            self.images.pop(tag, None)
        self._event("delete", data["Id"])
        return [{"Deleted": data["Id"]}]

    async def load_image(self, tarball: Any, progress: Any = None, *, name: str = "") -> list[str]:
        self._check()
        self.calls.append(("load", name or str(tarball)))
        raise ImageError("load: not supported by the fake")

    async def build_image(
        self,
        context_tar: Any,
        tag: str,
        labels: dict[str, str],
        buildargs: dict[str, str],
        progress: Any = None,
        *,
        network: bool = True,
    ) -> None:
        """Three steps like the classic builder: FROM busybox, COPY, RUN; each
        committed step leaves an image, as Docker's do. `offline_fails`: a step
        that fetches (the build fails without network)."""
        self._check()
        self.build_networks.append(network)
        if not network and self.offline_fails:
            raise ImageError(f"build {tag}: wget: bad address 'example.org'")
        if not isinstance(context_tar, bytes):  # streamed, as the daemon sends it
            context_tar = b"".join([piece async for piece in context_tar])
        self.calls.append(("build", tag))
        base = self.images["boincd-test/busybox:latest"]
        layers = [layer("busybox", 2_000_000)]
        lines = ["Step 1/3 : FROM boincd-test/busybox", f" ---> {base['Id'][7:19]}"]
        for step, (word, name) in enumerate((("COPY", "ctx"), ("RUN", "run")), start=2):
            lines.append(f"Step {step}/3 : {word} {name}")
            if step == self.build_fails_at:
                for line in lines:
                    progress({"stream": line + "\n"})
                raise ImageError(f"build {tag}: The command '/bin/sh -c {name}' returned 1")
            layers.append(layer(name + hashlib.sha256(context_tar).hexdigest(), 1000 * step))
            final = step == 3
            data = self.make(layers, labels if final else None)
            self.store.setdefault(data["Id"], data)
            lines.append(f" ---> {data['Id'][7:19]}")
        for line in lines:
            progress({"stream": line + "\n"})
        for step_image in self.store.values():  # parents of the result: hidden, as in Docker
            if (
                step_image is not data
                and step_image["RootFS"]["Layers"]
                == data["RootFS"]["Layers"][: len(step_image["RootFS"]["Layers"])]
                and not step_image["RepoTags"]
            ):
                step_image["_hidden"] = True
        self._tag(data["Id"], tag)
        self._event("tag", data["Id"])

    async def inspect_container(self, ref: str, *, size: bool = False) -> dict[str, Any]:
        data = await super().inspect_container(ref, size=size)
        if not size:
            return data
        self.size_calls.append(data["Id"])
        return {**data, "SizeRw": self.sizes_rw.get(data["Id"], 0)}

    async def list_containers(
        self, labels: dict[str, str], *, size: bool = False
    ) -> list[dict[str, Any]]:
        found = await super().list_containers(labels, size=size)
        if not size:
            return found
        self.size_calls.append("list")
        return [{**c, "SizeRw": self.sizes_rw.get(c["Id"], 0)} for c in found]

    async def list_volumes(self, labels: dict[str, str]) -> list[dict[str, Any]]:
        self._check()
        return list(self.volumes)

    async def image_events(self, since: float | None = None) -> AsyncIterator[dict[str, Any]]:
        self._check()
        while True:
            yield await self.image_events_queue.get()
