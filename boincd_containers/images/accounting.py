"""Exact disk accounting of images, container writable layers and volumes.

Pure: it works on plain data the engine adapter hands in and never calls the
engine itself, so it is tested on handmade data and kept up to date per event.

Where the per-layer sizes come from (measured against Docker 20.10 and Podman
4.3, see the engine tests). Neither engine has an API that lists layers with
sizes, but both return, in `GET /images/{id}/history`, for every history entry
that made a layer, the size of that one layer (Docker: the layer store's
`DiffSize` of the entry's ChainID, summed file sizes of the layer directory;
Podman: the layer's uncompressed tar size). Entries that made no layer (ENV,
LABEL...) have size 0. Docker's `/system/df` `LayersSize` is the sum of
`DiffSize` over the distinct ChainIDs of all images, so matching the non-empty
history entries, oldest first, to `RootFS.Layers` gives that sum to the byte.

The catch: the history API hides the `empty_layer` flag, and on Docker a real
layer can have size 0 (only directories, deletions or empty files). Entries of
size > 0 are layers for sure; among the zero-size ones the matching must pick as
many as there are layers left over. When the choice is not forced, the
instruction text (`#(nop) ENV`, `LABEL`...) and the sizes already known for
shared ChainIDs decide; a history that cannot be matched at all (no history)
falls back to the image's `Size` minus the known layers.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

# How a layer's sizes were found; the status output can show the less sure ones.
FROM_HISTORY = "history"  # the only matching of history to layers
FROM_HEURISTIC = "heuristic"  # several matchings; instruction text or known sizes chose
FROM_IMAGE_SIZE = "image-size"  # history unusable; image Size minus known layers
# A layer's size from a surer source replaces a guess from a less sure one.
_RANK = {FROM_IMAGE_SIZE: 0, FROM_HEURISTIC: 1, FROM_HISTORY: 2}

# Dockerfile instructions that only change the config, never the filesystem.
_CONFIG_ONLY = frozenset(
    {"ARG", "CMD", "ENTRYPOINT", "ENV", "EXPOSE", "HEALTHCHECK", "LABEL", "MAINTAINER"}
    | {"ONBUILD", "SHELL", "STOPSIGNAL", "USER", "VOLUME"}
)
_ALWAYS_LAYER = frozenset({"ADD", "COPY"})


def normalize_id(image_id: str) -> str:
    """Docker says `sha256:<hex>`, Podman's history and events a bare hex."""
    if ":" not in image_id and len(image_id) == 64:
        return "sha256:" + image_id
    return image_id


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """OCI ChainIDs: chain(L0) = L0, chain(Ln) = sha256(chain(Ln-1) + " " + Ln)."""
    chains: list[str] = []
    for diff_id in diff_ids:
        if not chains:
            chains.append(diff_id)
            continue
        digest = hashlib.sha256(f"{chains[-1]} {diff_id}".encode()).hexdigest()
        chains.append("sha256:" + digest)
    return chains


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    size: int
    created_by: str = ""


@dataclass(frozen=True, slots=True)
class ImageData:
    """What the engine says about one image; history is oldest first."""

    id: str
    diff_ids: tuple[str, ...]
    size: int
    history: tuple[HistoryEntry, ...] = ()
    refs: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_api(
        cls, inspect: Mapping[str, Any], history: Sequence[Mapping[str, Any]]
    ) -> ImageData:
        """From `GET /images/{id}/json` and `GET /images/{id}/history` (newest first)."""
        rootfs = inspect.get("RootFS") or {}
        config = inspect.get("Config") or {}
        entries = tuple(
            HistoryEntry(int(h.get("Size") or 0), str(h.get("CreatedBy") or ""))
            for h in reversed(history)
        )
        return cls(
            id=normalize_id(str(inspect["Id"])),
            diff_ids=tuple(str(d) for d in rootfs.get("Layers") or ()),
            size=int(inspect.get("Size") or 0),
            history=entries,
            refs=tuple(str(r) for r in inspect.get("RepoTags") or ()),
            labels=dict(config.get("Labels") or {}),
        )


class LayerSource(Protocol):
    """What the engine adapter implements for accounting (Docker and Podman alike).

    `image_inspect`: `GET /images/{id}/json`, the raw JSON object.
    `image_history`: `GET /images/{id}/history`, the raw JSON list, newest first;
    return [] when the engine refuses (Docker answers 500 for a config whose
    history names more layers than it has), the fallback then applies.
    The images to account are those of `GET /images/json` (without `all`),
    the same set Docker's `/system/df` counts.
    """

    async def image_inspect(self, image_id: str) -> Mapping[str, Any]: ...

    async def image_history(self, image_id: str) -> Sequence[Mapping[str, Any]]: ...


async def fetch_image_data(source: LayerSource, image_id: str) -> ImageData:
    inspect = await source.image_inspect(image_id)
    history = await source.image_history(image_id)
    return ImageData.from_api(inspect, history)


class _Kind(Enum):
    EMPTY = 0
    LAYER = 1
    UNKNOWN = 2


def _entry_kind(created_by: str) -> _Kind:
    """Guess from the instruction text whether a zero-size entry made a layer.

    The classic builder and Buildah write `/bin/sh -c #(nop) ENV ...` for
    instructions that run nothing; BuildKit writes the bare instruction
    (`ENV ...`). RUN and WORKDIR may or may not change the filesystem.
    """
    text = created_by.strip()
    if "#(nop)" in text:
        text = text.split("#(nop)", 1)[1]
    words = text.split(None, 1)
    word = words[0].upper() if words else ""
    if word in _CONFIG_ONLY:
        return _Kind.EMPTY
    if word in _ALWAYS_LAYER:
        return _Kind.LAYER
    return _Kind.UNKNOWN


def _match(
    history: Sequence[HistoryEntry],
    n_layers: int,
    allowed: Callable[[int, int], bool],
    cost: Callable[[int, bool], int],
) -> list[int] | None:
    """Monotone matching of layers to history entries, least cost; None if none.

    Every entry of size > 0 must get a layer. Returns the entry index of each
    layer. On ties a zero-size entry is skipped rather than matched, so the
    zero-size layers land on the latest candidates.
    """
    h, inf = len(history), 1 << 30
    # best[i][j]: least cost to match layers j.. to entries i..
    best = [[inf] * (n_layers + 1) for _ in range(h + 1)]
    best[h][n_layers] = 0
    for i in range(h - 1, -1, -1):
        for j in range(n_layers, -1, -1):
            options = []
            if history[i].size == 0 and best[i + 1][j] < inf:
                options.append(best[i + 1][j] + cost(i, False))
            if j < n_layers and allowed(i, j) and best[i + 1][j + 1] < inf:
                options.append(best[i + 1][j + 1] + cost(i, True))
            best[i][j] = min(options, default=inf)
    if best[0][0] >= inf:
        return None
    picked: list[int] = []
    j = 0
    for i in range(h):
        skip = best[i + 1][j] + cost(i, False) if history[i].size == 0 else inf
        if skip <= best[i][j] and best[i + 1][j] < inf:
            continue
        picked.append(i)
        j += 1
    return picked


def resolve_layer_sizes(
    image: ImageData,
    known: Mapping[str, int] | None = None,
    trusted: Callable[[str], bool] | None = None,
) -> tuple[list[int], str]:
    """Each layer's own size, in `image.diff_ids` order, and how it was found.

    `known` maps ChainIDs to sizes other images gave. Those that `trusted`
    accepts (default: all) steer an ambiguous matching; the image-size
    fallback keeps all of them, so one layer never gets two sizes.
    """
    known = known or {}
    chains = chain_ids(image.diff_ids)
    history = image.history
    n = len(chains)
    kinds = [_entry_kind(e.created_by) for e in history]

    def agrees(i: int, j: int) -> bool:
        size = known.get(chains[j])
        if size is None or (trusted is not None and not trusted(chains[j])):
            return True
        return size == history[i].size

    def text_cost(i: int, matched: bool) -> int:
        if history[i].size:
            return 0
        wrong = _Kind.EMPTY if matched else _Kind.LAYER
        return 1 if kinds[i] is wrong else 0

    # The earliest-possible and latest-possible matchings bound all others: if
    # they give the same sizes, the sizes are certain.
    latest = _match(history, n, _free, _no_cost)
    if latest is not None:
        earliest = _match_earliest(history, n)
        sizes = [history[i].size for i in latest]
        if earliest is not None and [history[i].size for i in earliest] == sizes:
            return sizes, FROM_HISTORY
        picked = _match(history, n, agrees, text_cost)
        if picked is not None:
            return [history[i].size for i in picked], FROM_HEURISTIC
    return _from_image_size(image, chains, known), FROM_IMAGE_SIZE


def _free(_entry: int, _layer: int) -> bool:
    return True


def _no_cost(_entry: int, _matched: bool) -> int:
    return 0


def _match_earliest(history: Sequence[HistoryEntry], n_layers: int) -> list[int] | None:
    # Latest-first on the reversed history is earliest-first on the history.
    rev = list(reversed(history))
    picked = _match(rev, n_layers, _free, _no_cost)
    if picked is None:
        return None
    return sorted(len(history) - 1 - i for i in picked)


def _from_image_size(
    image: ImageData, chains: Sequence[str], known: Mapping[str, int]
) -> list[int]:
    """Known layers keep their size; the rest of the image Size goes on the top
    unknown layer, which keeps the image's own total right."""
    sizes = [known.get(c, 0) for c in chains]
    unknown = [j for j, c in enumerate(chains) if c not in known]
    if unknown:
        sizes[unknown[-1]] = max(image.size - sum(sizes), 0)
    return sizes


@dataclass(frozen=True, slots=True)
class Layer:
    chain_id: str
    diff_id: str
    size: int


@dataclass(frozen=True, slots=True)
class ImageRecord:
    id: str
    layers: tuple[Layer, ...]
    refs: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    projects: frozenset[str] = frozenset()
    sizes_from: str = FROM_HISTORY

    @property
    def size_bytes(self) -> int:
        return sum(layer.size for layer in self.layers)


@dataclass(frozen=True, slots=True)
class ImageUsage:
    id: str
    refs: tuple[str, ...]
    size_bytes: int
    unique_bytes: int  # layers no other image uses
    shared_bytes: int  # layers at least one other image uses too
    projects: frozenset[str]
    sizes_from: str

    @property
    def ref(self) -> str:
        return self.refs[0] if self.refs else self.id


@dataclass(frozen=True, slots=True)
class ProjectUsage:
    project: str
    images: int
    used_bytes: int  # distinct layers of the project's images, each once
    exclusive_bytes: int  # of those, layers no image outside the project uses


@dataclass(frozen=True, slots=True)
class Totals:
    images_bytes: int
    images: int
    layers: int
    containers_bytes: int
    containers: int
    volumes_bytes: int
    volumes: int


class DiskAccount:
    """Images by distinct layers (ChainID), container writable layers, volumes.

    Add and remove cost O(layers of that image); totals are kept up to date,
    per-image and per-project figures are computed from memory on request.
    """

    def __init__(self) -> None:
        self._images: dict[str, ImageRecord] = {}
        self._data: dict[str, ImageData] = {}  # to account an image again
        self._layer_size: dict[str, int] = {}
        self._users: dict[str, set[str]] = {}  # ChainID -> image ids
        self._images_bytes = 0
        self._containers: dict[str, int] = {}
        self._volumes: dict[str, int] = {}
        # Counts changes to images, their layers, refs and projects: what a view
        # of the images is computed from (the status answer keeps one per version).
        self.images_version = 0

    @classmethod
    def from_images(cls, images: Iterable[tuple[ImageData, Iterable[str]]]) -> DiskAccount:
        """Full recompute. Fewer layers first: bases settle the sizes of shared
        layers before the images built on them, whatever order the engine lists."""
        account = cls()
        for data, projects in sorted(images, key=lambda p: (len(p[0].diff_ids), p[0].id)):
            account.add_image(data, projects)
        return account

    # images

    def add_image(self, data: ImageData, projects: Iterable[str] = ()) -> ImageRecord:
        self.images_version += 1
        return self._add_image(data, projects)

    def _add_image(self, data: ImageData, projects: Iterable[str] = ()) -> ImageRecord:
        """Account an image (again: a known id is replaced, keeping its projects
        when none are given)."""
        image_id = normalize_id(data.id)
        old = self._images.get(image_id)
        wanted = frozenset(projects) or (old.projects if old else frozenset())
        if old is not None:
            self.remove_image(image_id)
        sizes, source = resolve_layer_sizes(
            data, self._layer_size, lambda c: self._trust(c) >= _RANK[FROM_HEURISTIC]
        )
        chains = chain_ids(data.diff_ids)
        # Images whose guesses this one contradicts with better evidence (a
        # history-less image accounted before its base was) are accounted
        # again after it, on the sizes it establishes.
        rank = _RANK[source]
        displaced = sorted(
            {
                user
                for c, size in zip(chains, sizes, strict=True)
                if c in self._users and self._layer_size[c] != size and self._trust(c) < rank
                for user in self._users[c]
            }
        )
        redo = [(self._data[i], self._images[i].projects) for i in displaced]
        for user in displaced:
            self.remove_image(user)
        layers = tuple(
            Layer(c, d, self._layer_size.get(c, size))
            for c, d, size in zip(chains, data.diff_ids, sizes, strict=True)
        )
        record = ImageRecord(image_id, layers, data.refs, data.labels, wanted, source)
        self._images[image_id] = record
        self._data[image_id] = data
        for layer in layers:
            users = self._users.setdefault(layer.chain_id, set())
            if not users:
                self._layer_size[layer.chain_id] = layer.size
                self._images_bytes += layer.size
            users.add(image_id)
        for again, again_projects in redo:
            self.add_image(again, again_projects)
        return record

    def _trust(self, chain_id: str) -> int:
        return max(_RANK[self._images[i].sizes_from] for i in self._users[chain_id])

    def remove_image(self, image_id: str) -> ImageRecord | None:
        self.images_version += 1
        record = self._images.pop(normalize_id(image_id), None)
        if record is None:
            return None
        del self._data[record.id]
        for layer in record.layers:
            users = self._users[layer.chain_id]
            users.discard(record.id)
            if not users:
                del self._users[layer.chain_id]
                self._images_bytes -= self._layer_size.pop(layer.chain_id)
        return record

    def set_projects(self, image_id: str, projects: Iterable[str]) -> None:
        self.images_version += 1
        record = self._images[normalize_id(image_id)]
        self._images[record.id] = dataclasses.replace(record, projects=frozenset(projects))

    def set_refs(self, image_id: str, refs: Iterable[str]) -> None:
        """Tag and untag events change names, never layers."""
        self.images_version += 1
        record = self._images[normalize_id(image_id)]
        self._images[record.id] = dataclasses.replace(record, refs=tuple(refs))
        self._data[record.id] = dataclasses.replace(self._data[record.id], refs=tuple(refs))

    def __contains__(self, image_id: object) -> bool:
        return isinstance(image_id, str) and normalize_id(image_id) in self._images

    def record(self, image_id: str) -> ImageRecord | None:
        return self._images.get(normalize_id(image_id))

    @property
    def total_bytes(self) -> int:
        """Each distinct layer once; on Docker equals `/system/df` LayersSize."""
        return self._images_bytes

    @property
    def layer_sizes(self) -> Mapping[str, int]:
        return self._layer_size

    def image_usage(self, image_id: str) -> ImageUsage:
        record = self._images[normalize_id(image_id)]
        unique = sum(layer.size for layer in record.layers if len(self._users[layer.chain_id]) == 1)
        size = record.size_bytes
        return ImageUsage(
            record.id, record.refs, size, unique, size - unique, record.projects, record.sizes_from
        )

    def images(self) -> list[ImageUsage]:
        return [self.image_usage(i) for i in sorted(self._images)]

    def project_usage(self, project: str) -> ProjectUsage:
        members = [r for r in self._images.values() if project in r.projects]
        chains = {layer.chain_id for r in members for layer in r.layers}
        mine = frozenset({project})
        used = sum(self._layer_size[c] for c in chains)
        exclusive = sum(
            self._layer_size[c]
            for c in chains
            if all(self._images[i].projects == mine for i in self._users[c])
        )
        return ProjectUsage(project, len(members), used, exclusive)

    def projects(self) -> list[ProjectUsage]:
        names = {p for r in self._images.values() for p in r.projects}
        return [self.project_usage(p) for p in sorted(names)]

    # containers and volumes: the engine measures them, we only sum

    def set_container(self, container_id: str, size_rw: int | None) -> None:
        """`SizeRw` from `GET /containers/json?all=1&size=1` (absent: unknown, 0)."""
        self._containers[container_id] = max(size_rw or 0, 0)

    def container_bytes(self, container_id: str) -> int | None:
        """The container's writable layer as last measured; None: not ours or not yet."""
        return self._containers.get(container_id)

    def remove_container(self, container_id: str) -> None:
        self._containers.pop(container_id, None)

    def set_volume(self, name: str, size: int | None) -> None:
        """`UsageData.Size` from `/system/df`; the engine says -1 for unknown."""
        self._volumes[name] = max(size or 0, 0)

    def remove_volume(self, name: str) -> None:
        self._volumes.pop(name, None)

    def totals(self) -> Totals:
        return Totals(
            images_bytes=self._images_bytes,
            images=len(self._images),
            layers=len(self._layer_size),
            containers_bytes=sum(self._containers.values()),
            containers=len(self._containers),
            volumes_bytes=sum(self._volumes.values()),
            volumes=len(self._volumes),
        )
