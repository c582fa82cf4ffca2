"""A fake engine with an image store (layers, tags, history) and a fake registry,
for the image cache and inventory logic. It mimics what Docker shows through the
API (ids, RepoTags, RootFS layers, per-layer history sizes, 409 for an image a
container uses), not how Docker stores things; real-engine tests cover that."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from typing import Any

from boincd_containers.core.errors import BoincdError, Conflict, ImageError, NotFound
from boincd_containers.testing.fakes import (
    JSON,
    FakeContainers,
    FakeEngine,
    FakeImages,
    FakeVolumes,
    JSONList,
)

Layer = tuple[str, int]  # (content name, size): same name, same diff id


def layer(name: str, size: int) -> Layer:
    return (name, size)


def _digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


class StoredImages(FakeImages):
    """Images as the store of an ImageEngine holds them: by id, with layers."""

    def __init__(self, engine: ImageEngine) -> None:
        super().__init__(engine)
        self.fake = engine
        self.by_ref = {}  # ref -> inspect data, for FakeEngine's lookups

    def get(self, ref: str) -> JSON:
        if ref in self.by_ref:
            return self.by_ref[ref]
        store = self.fake.store
        if ref in store:
            return store[ref]
        for image_id, data in store.items():  # a short id, as build output gives
            if len(ref) >= 12 and image_id[7:].startswith(ref):
                return data
        raise NotFound(f"no such image: {ref}")

    async def inspect(self, ref: str) -> JSON:
        self._check()
        data = self.get(ref)
        return {k: v for k, v in data.items() if not k.startswith("_")}

    async def history(self, ref: str) -> JSONList:
        self._check()
        data = self.get(ref)
        return [{"Size": s, "CreatedBy": "ADD layer"} for s in reversed(data["_sizes"])]

    async def list(self, labels: dict[str, str] | None = None) -> JSONList:
        self._check()
        return [
            {"Id": i, "RepoTags": list(d["RepoTags"]) or ["<none>:<none>"], "Size": d["Size"]}
            for i, d in self.fake.store.items()
            if not d.get("_hidden")
            and all(d["Config"]["Labels"].get(k) == v for k, v in (labels or {}).items())
        ]

    async def tag(self, ref: str, new_ref: str) -> None:
        self._check()
        self.engine.calls.append(("tag", new_ref))
        self.fake.tag(str(self.get(ref)["Id"]), new_ref)
        self.fake.event("tag", new_ref)

    async def pull(self, ref: str, progress: Any = None) -> None:
        fake = self.fake
        self._check()
        fake.calls.append(("pull", ref))
        fake.pulls.append(ref)
        await asyncio.sleep(fake.pull_delay)
        if ref in fake.pull_errors:
            raise fake.pull_errors[ref]
        if ref not in fake.remote:
            raise ImageError(f"pull {ref}: manifest unknown")
        layers, labels = fake.remote[ref]
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
        data = fake.make(layers, labels)
        fake.store.setdefault(data["Id"], data)
        fake.tag(data["Id"], ref)
        fake.event("pull", ref)

    async def remove(self, ref: str) -> JSONList:
        fake = self.fake
        self._check()
        fake.calls.append(("rmi", ref))
        try:
            data = self.get(ref)
        except NotFound:
            return []
        if any(c["Image"] == data["Id"] for c in fake.containers.by_id.values()):
            raise Conflict(f"conflict: unable to delete {ref[:19]} - image is being used")
        del fake.store[data["Id"]]
        for tag in data["RepoTags"]:
            self.by_ref.pop(tag, None)
        fake.event("delete", data["Id"])
        return [{"Deleted": data["Id"]}]

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
        """Three steps like the classic builder: FROM busybox, COPY, RUN; each
        committed step leaves an image, as Docker's do. `offline_fails`: a step
        that fetches (the build fails without network)."""
        fake = self.fake
        self._check()
        fake.build_networks.append(network)
        if not network and fake.offline_fails:
            raise ImageError(f"build {tag}: wget: bad address 'example.org'")
        if not isinstance(context_tar, bytes):  # streamed, as the daemon sends it
            context_tar = b"".join([piece async for piece in context_tar])
        fake.calls.append(("build", tag))
        base = self.by_ref["boincd-test/busybox:latest"]
        layers = [layer("busybox", 2_000_000)]
        lines = ["Step 1/3 : FROM boincd-test/busybox", f" ---> {base['Id'][7:19]}"]
        for step, (word, name) in enumerate((("COPY", "ctx"), ("RUN", "run")), start=2):
            lines.append(f"Step {step}/3 : {word} {name}")
            if step == fake.build_fails_at:
                for line in lines:
                    progress({"stream": line + "\n"})
                raise ImageError(f"build {tag}: The command '/bin/sh -c {name}' returned 1")
            layers.append(layer(name + hashlib.sha256(context_tar).hexdigest(), 1000 * step))
            final = step == 3
            data = fake.make(layers, labels if final else None)
            fake.store.setdefault(data["Id"], data)
            lines.append(f" ---> {data['Id'][7:19]}")
        for line in lines:
            progress({"stream": line + "\n"})
        for step_image in fake.store.values():  # parents of the result: hidden, as in Docker
            if (
                step_image is not data
                and step_image["RootFS"]["Layers"]
                == data["RootFS"]["Layers"][: len(step_image["RootFS"]["Layers"])]
                and not step_image["RepoTags"]
            ):
                step_image["_hidden"] = True
        fake.tag(data["Id"], tag)
        fake.event("tag", data["Id"])


class SizedContainers(FakeContainers):
    """Containers whose writable layers have sizes (`sizes_rw`), as `size=true` shows."""

    def __init__(self, engine: ImageEngine) -> None:
        super().__init__(engine)
        self.fake = engine

    async def inspect(self, ref: str, *, size: bool = False) -> JSON:
        data = await super().inspect(ref, size=size)
        if not size:
            return data
        self.fake.size_calls.append(data["Id"])
        return {**data, "SizeRw": self.fake.sizes_rw.get(data["Id"], 0)}

    async def list(self, labels: dict[str, str], *, size: bool = False) -> JSONList:
        found = await super().list(labels, size=size)
        if not size:
            return found
        self.fake.size_calls.append("list")
        return [{**c, "SizeRw": self.fake.sizes_rw.get(c["Id"], 0)} for c in found]


class AnyVolumes(FakeVolumes):
    """Volumes listed whatever the labels asked for."""

    async def list(self, labels: dict[str, str]) -> JSONList:
        self._check()
        return list(self.by_name.values())


class ImageEngine(FakeEngine):
    def __init__(self) -> None:
        super().__init__()
        self.store: dict[str, JSON] = {}  # id -> inspect data (+ "_sizes")
        self.remote: dict[str, tuple[list[Layer], dict[str, str]]] = {}
        self.pull_errors: dict[str, BoincdError] = {}
        self.pulls: list[str] = []
        self.build_fails_at: int | None = None  # step number whose RUN fails
        self.build_networks: list[bool] = []  # network of each build (False: BOINC off)
        self.offline_fails = False
        self.sizes_rw: dict[str, int] = {}  # container id -> bytes its layer holds
        self.size_calls: list[str] = []  # "list" or the container id inspected with size
        self.images: StoredImages = StoredImages(self)
        self.containers: SizedContainers = SizedContainers(self)
        self.volumes: AnyVolumes = AnyVolumes(self)
        self.add_image("boincd-test/busybox:latest", [layer("busybox", 2_000_000)])

    # -- test controls --------------------------------------------------------------

    def make(self, layers: Sequence[Layer], labels: dict[str, str] | None = None) -> JSON:
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
            self.tag(data["Id"], ref)
        self.event("pull" if ref else "load", data["Id"])
        return str(data["Id"])

    def push(self, ref: str, layers: Sequence[Layer]) -> None:
        """What pulling `ref` brings from now on."""
        self.remote[ref] = (list(layers), {})

    def tag(self, image_id: str, ref: str) -> None:
        refs = self.images.by_ref
        old = refs.get(ref)
        if old is not None and old["Id"] != image_id:
            old["RepoTags"].remove(ref)
        data = self.store[image_id]
        if ref not in data["RepoTags"]:
            data["RepoTags"].append(ref)
        refs[ref] = data

    def event(self, action: str, actor: str) -> None:
        self.image_events_queue.put_nowait(
            {"Type": "image", "Action": action, "Actor": {"ID": actor, "Attributes": {}}}
        )
