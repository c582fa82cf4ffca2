"""Paths a BOINC user gives the root daemon: each escape refused, each accepted
path opened once (host/safepath.py), build contexts read with the owner's rights, and
the daemon's own mount points (host/mounts.py, root only)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from boincd_containers.core import labels as L
from boincd_containers.core.errors import BadRequest, BoincdError, Forbidden, ImageError
from boincd_containers.host.mounts import Entry, MountTable, mounted_paths, reopen, unmount
from boincd_containers.host.safepath import Owner, open_path
from boincd_containers.images.cache import find_archive
from boincd_containers.images.sources import BuildContext, build_context
from boincd_containers.job.spec import check_paths, parse_request

USER = 4321  # an unprivileged uid that owns the slot, as the BOINC user does
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, mount)")


def body(slot: Path, **extra: Any) -> dict[str, Any]:
    return {"result": "r_0", "project": "proj", "slot_dir": str(slot), "image": "img", **extra}


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    """A slot and project dir owned by USER, a root-only dir with a secret, and
    links an attacker could make; tmp_path's parents are root-owned."""
    base = tmp_path / "base"
    base.mkdir()
    secret = tmp_path / "secret"
    secret.mkdir(mode=0o700)
    (secret / "key").write_text("root only\n")
    (secret / "key").chmod(0o600)
    slot, project = base / "slot", base / "project"
    for d in (slot, project):
        d.mkdir()
    (slot / "data").mkdir()
    (slot / "data" / "sub").mkdir()
    (slot / "escape").symlink_to(secret)
    (slot / "inner").symlink_to("data")
    (slot / "image.tar").write_bytes(b"")
    (slot / "archive_link").symlink_to(secret / "key")
    (slot / "rootfile").write_text("root 0600 in the slot\n")
    (slot / "rootfile").chmod(0o600)
    writable = tmp_path / "open"  # a dir anyone may write in, like /tmp
    writable.mkdir()
    writable.chmod(0o1777)
    (writable / "slotlink").symlink_to(slot)
    if os.geteuid() == 0:
        for path in (base, slot, project, slot / "data", slot / "data" / "sub", slot / "image.tar"):
            os.chown(path, USER, USER)
        for link in ("escape", "inner", "archive_link"):
            os.lchown(slot / link, USER, USER)
    return {"slot": slot, "project": project, "secret": secret, "open": writable}


def _mount(source: str) -> dict[str, Any]:
    return {"mounts": [{"source": source, "target": "/x"}]}


# (name, slot relative to the fixture, request extras, error, message)
ESCAPES: list[tuple[str, Callable[[dict[str, Path]], dict[str, Any]], type, str]] = [
    ("slot /etc", lambda d: body(Path("/etc")), Forbidden, "not owned by the calling user"),
    ("slot is a symlink", lambda d: body(d["slot"].parent / "lnk"), Forbidden, "symbolic link"),
    (
        "slot through a link in a world-writable dir",
        lambda d: body(d["open"] / "slotlink" / "data"),
        Forbidden,
        "symbolic link",
    ),
    ("slot relative", lambda d: body(Path("slot")), BadRequest, "absolute"),
    ("slot with ..", lambda d: body(d["slot"] / ".." / "slot"), BadRequest, "'..'"),
    ("slot missing", lambda d: body(d["slot"] / "nope"), BadRequest, "not usable"),
    ("slot is a file", lambda d: body(d["slot"] / "image.tar"), BadRequest, "not a directory"),
    ("mount /etc", lambda d: body(d["slot"], **_mount("/etc")), Forbidden, "outside the slot"),
    ("mount ../", lambda d: body(d["slot"], **_mount("../")), Forbidden, "outside the slot"),
    ("mount a link out", lambda d: body(d["slot"], **_mount("escape")), Forbidden, "outside"),
    ("mount a link in", lambda d: body(d["slot"], **_mount("inner")), Forbidden, "symbolic link"),
    ("mount through a link", lambda d: body(d["slot"], **_mount("escape/x")), Forbidden, "link"),
    ("mount data/../..", lambda d: body(d["slot"], **_mount("data/../..")), Forbidden, "outside"),
    (
        "mount absolute with ..",
        lambda d: body(d["slot"], **_mount(f"{d['slot']}/../../secret")),
        Forbidden,
        "outside",
    ),
    (
        "mount absolute through a link",
        lambda d: body(d["slot"], **_mount(f"{d['slot']}/escape")),
        Forbidden,
        "outside",
    ),
    (
        "foreign project dir",
        lambda d: body(d["slot"], project_dir=str(d["secret"])),
        Forbidden,
        "not owned",
    ),
    (
        "project dir is a link",
        lambda d: body(d["slot"], project_dir=str(d["slot"] / "escape")),
        Forbidden,
        "symbolic link",
    ),
]


@root_only
@pytest.mark.parametrize("make", [e[1] for e in ESCAPES], ids=[e[0] for e in ESCAPES])
def test_every_escape_is_refused(dirs: dict[str, Path], make: Any) -> None:
    (dirs["slot"].parent / "lnk").symlink_to(dirs["secret"])
    kind, message = next((e[2], e[3]) for e in ESCAPES if e[1] is make)
    with pytest.raises(kind, match=message):
        check_paths(parse_request(make(dirs)), peer_uid=USER)


@root_only
@pytest.mark.parametrize(
    ("archive", "message"),
    [
        ("/etc/passwd", "outside the slot"),
        ("archive_link", "outside the slot"),
        ("../secret/key", "outside the slot"),
        ("rootfile", "not readable by the slot's owner"),
    ],
)
def test_an_archive_outside_or_unreadable_is_refused(
    dirs: dict[str, Path], archive: str, message: str
) -> None:
    request = parse_request({**body(dirs["slot"]), "image": None, "image_archive": archive})
    checked = check_paths(request, peer_uid=USER)
    try:
        with pytest.raises(BadRequest, match=message):
            find_archive(request, checked)
    finally:
        checked.close()


@root_only
def test_what_is_allowed_is_opened_once(dirs: dict[str, Path], tmp_path: Path) -> None:
    # A link in a root-owned dir nobody else may write (Debian's /var/lib/boinc) is fine.
    (tmp_path / "trusted").symlink_to(dirs["slot"].parent)
    request = parse_request(
        body(
            tmp_path / "trusted" / "slot",
            project_dir=str(dirs["project"]),
            mounts=[
                {"source": "data/sub", "target": "/a"},
                {"source": f"{dirs['slot']}/data", "target": "/b"},
                {"source": str(dirs["project"]), "target": "/p"},
            ],
        )
    )
    checked = check_paths(request, peer_uid=USER)
    try:
        assert checked.ids == (USER, USER)
        assert checked.slot.path == str(dirs["slot"])  # as reached: the link replaced
        assert [(kind, rel) for _, kind, rel, _ in checked.sources] == [
            ("slot", "data/sub"),
            ("slot", "data"),
            ("project", ""),
        ]
        # Swapping the slot for a link afterwards changes nothing already opened.
        dirs["slot"].rename(dirs["slot"].with_name("moved"))
        dirs["slot"].symlink_to(dirs["secret"])
        assert (
            os.stat(checked.slot.proc_path).st_ino
            == os.stat(dirs["slot"].with_name("moved")).st_ino
        )
    finally:
        checked.close()


def test_owner_permissions_are_posix() -> None:
    owner = Owner(USER, 100, frozenset({100, 200}))
    st = os.stat_result((0o100440, 0, 0, 1, USER, 0, 0, 0, 0, 0))
    assert owner.may(st, 4)
    assert not owner.may(st, 2)
    st = os.stat_result((0o100066, 0, 0, 1, USER, 200, 0, 0, 0, 0))  # owner class wins
    assert not owner.may(st, 4)
    st = os.stat_result((0o100604, 0, 0, 1, 0, 0, 0, 0, 0, 0))
    assert owner.may(st, 4)
    st = os.stat_result((0o100600, 0, 0, 1, 0, 0, 0, 0, 0, 0))
    assert not owner.may(st, 4)


# -- build contexts ---------------------------------------------------------------------


def _names(context: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(context)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


@root_only
def test_build_context_never_follows_links_nor_reads_what_the_owner_cannot(
    dirs: dict[str, Path],
) -> None:
    slot = dirs["slot"]
    (slot / "rootfile").unlink()
    (slot / "Dockerfile").write_text("FROM x\nCOPY . /\n")
    (slot / "data" / "app.py").write_text("print(1)\n")
    (slot / "data" / "secret_link").symlink_to(dirs["secret"] / "key")
    (slot / "dirlink").symlink_to(dirs["secret"])
    os.mkfifo(slot / "fifo")  # would hang a reader that opened it blocking
    opened = open_path(str(slot), "slot dir")
    owner = Owner.of(USER, USER)
    try:
        files = _names(build_context(opened, owner))
        assert files == {
            "Dockerfile": b"FROM x\nCOPY . /\n",
            "data/app.py": b"print(1)\n",
            "image.tar": b"",
        }
        # A root-only file in the slot (a hard link, were links to it allowed) fails the build.
        (slot / "data" / "root.txt").write_text("no")
        (slot / "data" / "root.txt").chmod(0o600)
        with pytest.raises(ImageError, match=r"data/root\.txt is not readable"):
            build_context(opened, owner)
    finally:
        opened.close()


def test_build_context_is_a_valid_tar_and_capped(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM x\n")
    (tmp_path / ("long" * 40)).write_bytes(b"x" * 1000)  # a PAX long name
    (tmp_path / "setuid").write_bytes(b"#!")
    (tmp_path / "setuid").chmod(0o4755)
    context = build_context(tmp_path)
    assert len(context) % tarfile.RECORDSIZE == 0
    with tarfile.open(fileobj=io.BytesIO(context)) as tar:
        members = {m.name: m for m in tar}
    assert members["long" * 40].size == 1000
    assert members["setuid"].mode == 0o755  # no setuid bits from a slot into an image
    opened = open_path(str(tmp_path), "slot dir")
    try:
        context_obj = BuildContext(opened, Owner.of(os.getuid(), os.getgid()), cap=1500)
        with pytest.raises(ImageError, match="larger than"):
            context_obj.digest()
        context_obj.close()
        BuildContext(opened, Owner.of(0, 0)).close()  # never iterated: no descriptor left
    finally:
        opened.close()


# -- mount points -----------------------------------------------------------------------


@root_only
def test_mount_points_are_the_opened_dirs_and_go_away(
    dirs: dict[str, Path], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    table = MountTable(state)
    table.bind = True  # unit tests turn it off (conftest.py): here it is under test
    request = parse_request(body(dirs["slot"], mounts=[{"source": "data", "target": "/d"}]))
    checked = check_paths(request, peer_uid=USER)
    try:
        paths = table.prepare("boincd__p__r", checked.entries(request))
    finally:
        checked.close()
    try:
        assert paths == [str(state / "mounts/boincd__p__r/0"), str(state / "mounts/boincd__p__r/1")]
        assert set(paths) <= mounted_paths()
        assert oct((state / "mounts").stat().st_mode & 0o777) == "0o700"
        # The slot swapped for a link to the root-only dir: the mount point still is the slot.
        dirs["slot"].rename(dirs["slot"].with_name("moved"))
        dirs["slot"].symlink_to(dirs["secret"])
        assert sorted(os.listdir(paths[0]))[:2] == ["archive_link", "data"]
        assert not Path(paths[0], "key").exists()
        table.created("boincd__p__r")
        assert table.sweep({"boincd__p__r"}) == []
    finally:
        table.release("boincd__p__r")
    assert not set(paths) & mounted_paths()
    assert not (state / "mounts" / "boincd__p__r").exists()
    assert (dirs["slot"].with_name("moved") / "data").is_dir()  # never emptied


@root_only
def test_a_recorded_mount_is_walked_again_with_the_same_checks(dirs: dict[str, Path]) -> None:
    slot = dirs["slot"]
    st = slot.stat()
    entry = Entry("slot", "data", USER, (st.st_dev, st.st_ino), True)
    reopen(entry, {"slot": str(slot)}).close()
    with pytest.raises(Forbidden, match="symbolic link"):
        reopen(Entry("slot", "escape", USER, (0, 0), True), {"slot": str(slot)})
    with pytest.raises(Forbidden, match="no longer owned"):
        reopen(Entry("slot", "", USER + 1, (0, 0), True), {"slot": str(slot)})
    slot.rename(slot.with_name("moved"))
    slot.symlink_to(dirs["secret"])
    with pytest.raises(BoincdError, match="symbolic link"):
        reopen(entry, {"slot": str(slot)})


@root_only
def test_mount_points_gone_after_a_reboot_are_made_again_before_start(
    dirs: dict[str, Path], tmp_path: Path
) -> None:
    table = MountTable(tmp_path / "state")
    table.bind = True
    request = parse_request(body(dirs["slot"]))
    checked = check_paths(request, peer_uid=USER)
    try:
        entries = checked.entries(request)
        paths = table.prepare("boincd__p__r", entries)
    finally:
        checked.close()
    container = {
        "Config": {
            "Labels": {
                L.SLOT: str(dirs["slot"]),
                L.MOUNTS: json.dumps([e.to_json() for e, _ in entries]),
            }
        },
        "HostConfig": {"Mounts": [{"Source": paths[0], "Target": "/app"}]},
    }
    try:
        unmount(paths[0])  # what a reboot does to it
        table.ensure("boincd__p__r", container)
        assert paths[0] in mounted_paths()
        assert (Path(paths[0]) / "data").is_dir()
        # Gone again, and the slot swapped for a link meanwhile: refused, not followed.
        unmount(paths[0])
        dirs["slot"].rename(dirs["slot"].with_name("moved"))
        dirs["slot"].symlink_to(dirs["secret"])
        with pytest.raises(Forbidden, match="symbolic link"):
            table.ensure("boincd__p__r", container)
        assert paths[0] not in mounted_paths()
    finally:
        table.release("boincd__p__r")
