"""Image disk accounting on handmade data (the engine tests check real engines)."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

import pytest

from boincd_containers.images.accounting import (
    FROM_HEURISTIC,
    FROM_HISTORY,
    FROM_IMAGE_SIZE,
    DiskAccount,
    HistoryEntry,
    ImageData,
    chain_ids,
    normalize_id,
    resolve_layer_sizes,
)

# Real values from this machine's dockerd: an imported busybox and a
# `COPY` layer on it; the second ChainID is the layerdb directory Docker made.
BASE = "sha256:83de2068d6a1860884b527acbca580b8549d54f56046b7c8ed6e6aabd5b3734b"
COPY_F1 = "sha256:eb6561e8947f8fc641b22ebec1aeee9464217c6d58c3caf57d357ee7f9112e09"
CHAIN_BASE_F1 = "sha256:48681e47382c7f6f92ee1146ebac2f7e4d0bbaf256ed4016084503cbbe8edcf5"


def diff(name: str) -> str:
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


def image(
    image_id: str, layers: list[tuple[str, int]], *, extra: Sequence[tuple[int, int, str]] = ()
) -> ImageData:
    """An image whose history is one entry per layer, plus `extra` empty entries
    inserted before layer position `pos` as (pos, size, created_by)."""
    entries = [HistoryEntry(size, f"/bin/sh -c cp {name}") for name, size in layers]
    for pos, size, text in sorted(extra, reverse=True):
        entries.insert(pos, HistoryEntry(size, text))
    return ImageData(
        id=image_id,
        diff_ids=tuple(diff(name) for name, _ in layers),
        size=sum(size for _, size in layers),
        history=tuple(entries),
        refs=(f"test/{image_id}:1",),
    )


def test_chain_ids_follow_the_oci_definition() -> None:
    assert chain_ids([]) == []
    assert chain_ids([BASE]) == [BASE]
    assert chain_ids([BASE, COPY_F1]) == [BASE, CHAIN_BASE_F1]
    third = diff("x")
    expected = "sha256:" + hashlib.sha256(f"{CHAIN_BASE_F1} {third}".encode()).hexdigest()
    assert chain_ids([BASE, COPY_F1, third])[2] == expected


def test_normalize_id_adds_the_algorithm_podman_leaves_out() -> None:
    hexid = "a" * 64
    assert normalize_id(hexid) == "sha256:" + hexid
    assert normalize_id("sha256:" + hexid) == "sha256:" + hexid
    assert normalize_id("busybox:latest") == "busybox:latest"


def test_from_api_reads_inspect_and_newest_first_history() -> None:
    inspect = {
        "Id": "b" * 64,
        "RepoTags": ["x/y:1"],
        "Size": 110,
        "RootFS": {"Type": "layers", "Layers": [BASE, COPY_F1]},
        "Config": {"Labels": {"k": "v"}},
    }
    history = [
        {"Size": 0, "CreatedBy": '/bin/sh -c #(nop)  CMD ["sh"]'},
        {"Size": 10, "CreatedBy": "/bin/sh -c #(nop) COPY file:abc in /f1 "},
        {"Size": 100, "CreatedBy": "", "Comment": "Imported from -"},
    ]
    data = ImageData.from_api(inspect, history)
    assert data.id == "sha256:" + "b" * 64
    assert data.diff_ids == (BASE, COPY_F1)
    assert [e.size for e in data.history] == [100, 10, 0]
    assert data.labels == {"k": "v"}
    assert resolve_layer_sizes(data) == ([100, 10], FROM_HISTORY)


def test_image_without_layers_or_labels() -> None:
    data = ImageData.from_api({"Id": "sha256:" + "c" * 64, "RootFS": {}, "Config": None}, [])
    assert data.diff_ids == ()
    assert resolve_layer_sizes(data) == ([], FROM_HISTORY)


def test_empty_entries_are_skipped() -> None:
    data = image("a", [("l1", 100), ("l2", 7)], extra=[(1, 0, "/bin/sh -c #(nop)  ENV A=1")])
    assert resolve_layer_sizes(data) == ([100, 7], FROM_HISTORY)


def test_zero_size_layers_in_one_gap_are_certain() -> None:
    # ENV and `mkdir` both sit between the two sized layers: the sizes read the same either way.
    data = image(
        "a",
        [("l1", 100), ("mkdir", 0), ("l3", 5)],
        extra=[(1, 0, "/bin/sh -c #(nop)  ENV A=1")],
    )
    assert resolve_layer_sizes(data) == ([100, 0, 5], FROM_HISTORY)


def test_ambiguous_zero_size_layer_is_placed_by_instruction_text() -> None:
    # Docker's real history of `FROM base; LABEL; COPY f2; ENV; RUN rm /bin/true`:
    # three layers, the `rm` layer has size 0 (whiteouts only).
    history = (
        HistoryEntry(1982305, ""),
        HistoryEntry(0, "/bin/sh -c #(nop)  LABEL x=z"),
        HistoryEntry(5000, "/bin/sh -c #(nop) COPY file:ca25 in /f2 "),
        HistoryEntry(0, "/bin/sh -c #(nop)  ENV B=2"),
        HistoryEntry(0, "/bin/sh -c rm /bin/true"),
    )
    data = ImageData("i", (BASE, diff("f2"), diff("rm")), 1987305, history)
    assert resolve_layer_sizes(data) == ([1982305, 5000, 0], FROM_HEURISTIC)
    # The same with BuildKit's instruction texts.
    texts = ["", "LABEL x=z", "COPY f2 /f2 # buildkit", "ENV B=2", "RUN rm /bin/true"]
    buildkit = tuple(HistoryEntry(e.size, t) for e, t in zip(history, texts, strict=True))
    data = ImageData("i", data.diff_ids, data.size, buildkit)
    assert resolve_layer_sizes(data) == ([1982305, 5000, 0], FROM_HEURISTIC)


def test_known_layer_sizes_settle_what_the_text_cannot() -> None:
    # Two zero-size RUN entries, one a layer, on either side of a sized one.
    history = (
        HistoryEntry(50, "/bin/sh -c build"),
        HistoryEntry(0, "/bin/sh -c true"),
        HistoryEntry(9, "/bin/sh -c make"),
        HistoryEntry(0, "/bin/sh -c mkdir /x"),
    )
    data = ImageData("i", (diff("a"), diff("b"), diff("c")), 59, history)
    chains = chain_ids(data.diff_ids)
    # Without help the zero-size layer goes on the latest candidate.
    assert resolve_layer_sizes(data) == ([50, 9, 0], FROM_HEURISTIC)
    assert resolve_layer_sizes(data, {chains[1]: 0}) == ([50, 0, 9], FROM_HEURISTIC)


def test_missing_history_falls_back_to_image_size_minus_known_layers() -> None:
    data = ImageData("i", (diff("a"), diff("b"), diff("c")), 1000)
    chains = chain_ids(data.diff_ids)
    assert resolve_layer_sizes(data, {chains[0]: 600}) == ([600, 0, 400], FROM_IMAGE_SIZE)
    # More sized entries than layers: no matching exists either.
    bad = ImageData("i", (diff("a"),), 10, (HistoryEntry(5), HistoryEntry(5)))
    assert resolve_layer_sizes(bad) == ([10], FROM_IMAGE_SIZE)


def test_shared_layers_count_once_and_split_unique_from_shared() -> None:
    account = DiskAccount()
    account.add_image(image("base", [("os", 1000)]), ["p1"])
    account.add_image(image("a", [("os", 1000), ("app-a", 30), ("cfg", 4)]), ["p1"])
    account.add_image(image("b", [("os", 1000), ("app-b", 200)]), ["p2"])
    assert account.total_bytes == 1000 + 30 + 4 + 200
    a = account.image_usage("a")
    assert (a.size_bytes, a.unique_bytes, a.shared_bytes) == (1034, 34, 1000)
    base = account.image_usage("base")
    assert (base.size_bytes, base.unique_bytes, base.shared_bytes) == (1000, 0, 1000)
    assert account.image_usage("b").ref == "test/b:1"

    account.remove_image("b")
    assert account.total_bytes == 1034
    assert account.remove_image("b") is None
    account.remove_image("base")
    a = account.image_usage("a")
    assert (a.unique_bytes, a.shared_bytes) == (1034, 0)
    account.remove_image("a")
    assert account.total_bytes == 0
    assert account.layer_sizes == {}


def test_per_project_use_and_exclusive_bytes() -> None:
    account = DiskAccount()
    account.add_image(image("a", [("os", 1000), ("a", 10)]), ["p1"])
    account.add_image(image("b", [("os", 1000), ("b", 20)]), ["p1"])
    account.add_image(image("c", [("os", 1000), ("c", 40)]), ["p2"])
    account.add_image(image("d", [("lib", 300), ("d", 1)]), ["p1", "p2"])
    account.add_image(image("own", [("lib", 300), ("own", 5)]))  # a volunteer's image
    p1 = account.project_usage("p1")
    assert (p1.images, p1.used_bytes, p1.exclusive_bytes) == (3, 1000 + 10 + 20 + 300 + 1, 30)
    p2 = account.project_usage("p2")
    assert (p2.images, p2.used_bytes, p2.exclusive_bytes) == (2, 1000 + 40 + 300 + 1, 40)
    assert [p.project for p in account.projects()] == ["p1", "p2"]

    account.remove_image("c")
    assert account.project_usage("p1").exclusive_bytes == 1000 + 10 + 20
    account.set_projects("d", ["p1"])
    assert account.project_usage("p1").exclusive_bytes == 1000 + 10 + 20 + 1
    assert account.project_usage("p2").images == 0


def test_readding_an_image_keeps_its_projects_and_tags_change_nothing_else() -> None:
    account = DiskAccount()
    account.add_image(image("a", [("os", 1000)]), ["p1"])
    account.add_image(image("a", [("os", 1000)]))
    assert account.image_usage("a").projects == {"p1"}
    assert account.total_bytes == 1000
    account.set_refs("a", ["x:2", "x:latest"])
    assert account.image_usage("a").refs == ("x:2", "x:latest")
    assert "a" in account
    assert account.totals().images == 1


def test_shared_layer_keeps_its_first_size() -> None:
    # A history-less image built on a known base must not give the base a new size.
    account = DiskAccount()
    account.add_image(image("base", [("os", 1000)]))
    bare = ImageData("bare", (diff("os"), diff("top")), 1070)
    record = account.add_image(bare)
    assert [layer.size for layer in record.layers] == [1000, 70]
    assert record.sizes_from == FROM_IMAGE_SIZE
    assert account.total_bytes == 1070


def test_history_corrects_an_earlier_guess() -> None:
    # The history-less image comes first (its base hidden or not yet pulled):
    # its guess puts everything on the top layer, until the base's history shows
    # the shared layer's real size.
    bare = ImageData("bare", (diff("os"), diff("top")), 1070)
    app = image("app", [("os", 1000), ("app", 5)])
    account = DiskAccount()
    account.add_image(bare, ["p1"])
    assert account.total_bytes == 1070
    account.add_image(app)
    bare_record = account.record("bare")
    assert bare_record is not None
    assert [layer.size for layer in bare_record.layers] == [1000, 70]
    assert bare_record.projects == {"p1"}
    assert account.total_bytes == 1000 + 70 + 5
    assert snapshot(account) == snapshot(DiskAccount.from_images([(bare, ["p1"]), (app, [])]))


def test_certain_history_corrects_a_heuristic_guess() -> None:
    # Two zero-size RUN entries, one a layer: alone, the guess is wrong.
    history = (
        HistoryEntry(50, "/bin/sh -c build"),
        HistoryEntry(0, "/bin/sh -c mkdir /x"),
        HistoryEntry(9, "/bin/sh -c make"),
        HistoryEntry(0, "/bin/sh -c true"),
    )
    ambiguous = ImageData("amb", (diff("a"), diff("b"), diff("c")), 59, history)
    base = image("base", [("a", 50), ("b", 0)])
    account = DiskAccount()
    assert account.add_image(ambiguous).sizes_from == FROM_HEURISTIC
    account.add_image(base)
    record = account.record("amb")
    assert record is not None
    assert [layer.size for layer in record.layers] == [50, 0, 9]
    assert account.total_bytes == 59


def test_containers_and_volumes_are_separate_totals() -> None:
    account = DiskAccount()
    account.add_image(image("a", [("os", 1000)]))
    account.set_container("c1", 12)
    account.set_container("c2", None)
    account.set_volume("v1", 4096)
    account.set_volume("v2", -1)  # the engine did not measure it
    totals = account.totals()
    assert (totals.images_bytes, totals.images, totals.layers) == (1000, 1, 1)
    assert (totals.containers_bytes, totals.containers) == (12, 2)
    assert (totals.volumes_bytes, totals.volumes) == (4096, 2)
    account.remove_container("c1")
    account.remove_volume("v1")
    account.remove_volume("never-there")
    totals = account.totals()
    assert (totals.containers_bytes, totals.volumes_bytes) == (0, 0)


def snapshot(account: DiskAccount) -> tuple[object, ...]:
    return (
        account.total_bytes,
        dict(account.layer_sizes),
        account.images(),
        account.projects(),
        account.totals(),
    )


@pytest.mark.parametrize("seed", range(20))
def test_incremental_updates_equal_a_full_recompute(seed: int) -> None:
    rng = random.Random(seed)
    # A small forest of images: each extends a random earlier one, as builds do.
    pool: list[tuple[ImageData, list[str]]] = []
    truth: dict[str, int] = {}
    stacks: list[list[tuple[str, int]]] = [[]]
    for n in range(12):
        layers = list(rng.choice(stacks))
        for k in range(rng.randint(1, 3)):
            layers.append((f"l{n}-{k}", rng.choice([0, 1, 512, 4096, 10**6])))
        stacks.append(layers)
        data = image(f"img{n}", layers, extra=[(rng.randint(0, len(layers)), 0, "ENV X=1")])
        truth.update(zip(chain_ids(data.diff_ids), (size for _, size in layers), strict=True))
        pool.append((data, rng.sample(["p1", "p2", "p3"], rng.randint(0, 2))))

    account = DiskAccount()
    present: dict[str, tuple[ImageData, list[str]]] = {}
    for _ in range(60):
        if present and rng.random() < 0.4:
            gone = rng.choice(sorted(present))
            account.remove_image(gone)
            del present[gone]
        else:
            data, projects = rng.choice(pool)
            account.add_image(data, projects)
            # Re-adding without projects keeps the old ones.
            kept = projects or (present[data.id][1] if data.id in present else [])
            present[data.id] = (data, kept)
        assert snapshot(account) == snapshot(DiskAccount.from_images(present.values()))
        chains = {c for data, _ in present.values() for c in chain_ids(data.diff_ids)}
        assert account.total_bytes == sum(truth[c] for c in chains)
