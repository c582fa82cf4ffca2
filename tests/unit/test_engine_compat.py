"""Docker/Podman differences as the adapter corrects them (messages as measured)."""

from __future__ import annotations

from typing import Any

import pytest

from boincd_containers.core import labels as L
from boincd_containers.core.errors import Conflict, NotFound
from boincd_containers.engine import compat as C

CID = "f21a4f691c15"


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        (f'"{CID}" is already paused: container state improper', Conflict),
        (f'"{CID}" is not paused, can\'t unpause: container state improper', Conflict),
        (
            f"can only kill running containers. {CID} is in state exited: container state improper",
            Conflict,
        ),
        (
            'container create: the container name "x" is already in use by 1: that name is '
            "already in use",
            Conflict,
        ),
        ('no container with name or ID "x" found: no such container', NotFound),
    ],
)
def test_podman_500s_that_are_conflicts_or_missing_objects(message: str, kind: type) -> None:
    assert isinstance(C.reclassify(500, message), kind)


def test_real_engine_failures_keep_their_status() -> None:
    assert C.reclassify(500, "error creating overlay mount: input/output error") is None
    assert C.reclassify(409, "is already paused") is None  # already right


def test_a_network_rootless_podman_cannot_give_is_a_clear_permanent_error() -> None:
    message = '/usr/bin/slirp4netns failed: "open(\\"/dev/net/tun\\"): Permission denied"'
    error = C.reclassify(500, message)
    assert isinstance(error, Conflict)
    assert error.retryable is False
    assert "rootful engine" in error.message


def test_no_freezer_messages() -> None:
    assert C.cannot_freeze(
        "can not pause containers on rootless containers with cgroup V1: "
        "this container does not have a cgroup"
    )
    assert not C.cannot_freeze(f'"{CID}" is already paused: container state improper')


CONTROLLERS = ["cpuset", "cpu", "cpuacct", "blkio", "memory", "devices", "freezer", "pids"]


def libpod(rootless: bool, controllers: list[str]) -> dict[str, Any]:
    return {"host": {"security": {"rootless": rootless}, "cgroupControllers": controllers}}


def test_limits_of_rootful_and_rootless_podman_on_cgroup_v1() -> None:
    # Podman's compatible /info claims limits even rootless; /libpod/info does not.
    info = {"CgroupVersion": "1", "MemoryLimit": True, "CpuCfsQuota": True, "PidsLimit": True}
    assert C.engine_limits(True, info, libpod(False, CONTROLLERS)) == (C.ALL_LIMITS, True)
    assert C.engine_limits(True, info, libpod(True, [])) == (frozenset(), False)


def test_limits_of_rootless_podman_on_cgroup_v2_follow_delegation() -> None:
    info = {"CgroupVersion": "2"}
    assert C.engine_limits(True, info, libpod(True, ["cpu", "pids"])) == (
        frozenset({"cpu", "pids"}),
        True,
    )


def test_limits_of_docker_from_its_info() -> None:
    info = {"CgroupVersion": "1", "MemoryLimit": True, "CpuCfsQuota": True, "PidsLimit": True}
    assert C.engine_limits(False, info, None) == (C.ALL_LIMITS, True)
    rootless_v1 = {
        "CgroupVersion": "1",
        "SecurityOptions": ["name=rootless"],
        "MemoryLimit": False,
        "CpuCfsQuota": False,
        "PidsLimit": False,
    }
    assert C.engine_limits(False, rootless_v1, None) == (frozenset(), False)


def create_body(user: str = "1001:1001") -> dict[str, Any]:
    return {
        "User": user,
        "Labels": {L.OWNER: "me"},
        "HostConfig": {
            "NanoCpus": 1_500_000_000,
            "Memory": 64 << 20,
            "MemorySwap": 64 << 20,
            "PidsLimit": 4096,
            "NetworkMode": "none",
        },
    }


def test_unapplicable_limits_are_removed_and_named() -> None:
    config = create_body()
    C.adapt_create(config, "rootless Podman 4.3.1", frozenset({"pids"}), (), ())
    host = config["HostConfig"]
    assert "NanoCpus" not in host
    assert "Memory" not in host
    assert "MemorySwap" not in host
    assert host["PidsLimit"] == 4096
    assert host["NetworkMode"] == "none"
    assert config["Labels"][L.UNENFORCED] == "cpu,memory"
    warning = config["Labels"][L.WARNINGS]
    assert warning.startswith("rootless Podman 4.3.1 cannot limit this task's CPU and memory")
    assert "stops it above BOINC's bound" in warning


def test_nothing_changes_when_the_engine_applies_every_limit() -> None:
    config = create_body()
    C.adapt_create(config, "Docker 20.10.24", C.ALL_LIMITS, (), ())
    assert config == create_body()


UIDS = ((0, 1001, 1), (1, 100000, 65536))


def test_slot_owner_is_mapped_into_the_rootless_namespace() -> None:
    # The engine's own user is root inside; a subordinate id is its offset plus one.
    assert C.map_user("1001:1001", UIDS, UIDS) == "0:0"
    assert C.map_user("100004:100004", UIDS, UIDS) == "5:5"
    assert C.map_user("1001", UIDS, UIDS) == "0"
    assert C.map_user("boinc", UIDS, UIDS) == "boinc"  # a name: the engine resolves it
    assert C.map_user("4321:4322", (), ()) == "4321:4322"  # rootful: no namespace


def test_a_slot_owner_outside_the_namespace_is_refused_clearly() -> None:
    with pytest.raises(Conflict, match="cannot map"):
        C.map_user("103:106", UIDS, UIDS)


def test_id_maps_from_libpod_info() -> None:
    info = {
        "host": {
            "idMappings": {
                "uidmap": [{"container_id": 0, "host_id": 1001, "size": 1}],
                "gidmap": None,
            }
        }
    }
    assert C.id_maps(info) == (((0, 1001, 1),), ())
    assert C.id_maps(None) == ((), ())


def test_podman_event_names_become_dockers() -> None:
    event = {"Type": "container", "Action": "remove", "status": "remove"}
    assert C.normalize_event(event)["Action"] == "destroy"
    assert event["status"] == "destroy"
    image = {"Type": "image", "Action": "loadfromarchive"}
    assert C.normalize_event(image)["Action"] == "load"
    same = {"Type": "container", "Action": "die"}
    assert C.normalize_event(same) == {"Type": "container", "Action": "die"}
