from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from boincd_containers import labels as L
from boincd_containers.errors import BadRequest, Forbidden
from boincd_containers.taskspec import check_paths, container_config, parse_request


def body(slot: Path, **extra: Any) -> dict[str, Any]:
    return {"result": "r_0", "project": "proj", "slot_dir": str(slot), "image": "img", **extra}


def test_parse_request_names_the_bad_field(tmp_path: Path) -> None:
    with pytest.raises(BadRequest, match="unknown field"):
        parse_request(body(tmp_path, colour="blue"))
    with pytest.raises(BadRequest, match="'command' must be a list of strings"):
        parse_request(body(tmp_path, command=["a", 1]))
    with pytest.raises(BadRequest, match="'ncpus'"):
        parse_request(body(tmp_path, ncpus=0))
    with pytest.raises(BadRequest, match="number"):
        parse_request(body(tmp_path, ncpus=True))
    with pytest.raises(BadRequest, match="required"):
        parse_request({"result": "r"})
    with pytest.raises(BadRequest, match="names no image"):
        parse_request({"result": "r", "project": "p", "slot_dir": str(tmp_path)})
    with pytest.raises(BadRequest, match="must be absolute"):
        parse_request(body(tmp_path, workdir="app"))
    with pytest.raises(BadRequest, match="JSON object"):
        parse_request([1, 2])


def test_mounts_must_stay_inside_slot_and_project(tmp_path: Path) -> None:
    slot = tmp_path / "slot"
    project = tmp_path / "project"
    slot.mkdir()
    project.mkdir()
    (slot / "data").mkdir()
    (slot / "escape").symlink_to("/etc")
    ok = parse_request(
        body(
            slot,
            project_dir=str(project),
            mounts=[
                {"source": "data", "target": "/data"},
                {"source": str(project), "target": "/p", "read_only": True},
            ],
        )
    )
    assert check_paths(ok, peer_uid=0) == (os.getuid(), os.getgid())
    for source in ("/etc", "../", "escape"):
        bad = parse_request(body(slot, mounts=[{"source": source, "target": "/x"}]))
        with pytest.raises(Forbidden, match="outside the slot"):
            check_paths(bad, peer_uid=0)


def test_non_root_caller_must_own_the_slot(tmp_path: Path) -> None:
    request = parse_request(body(tmp_path))
    with pytest.raises(Forbidden, match="not owned by the calling user"):
        check_paths(request, peer_uid=os.getuid() + 12345)
    with pytest.raises(BadRequest, match="not usable"):
        check_paths(parse_request(body(tmp_path / "missing")), peer_uid=0)


def test_container_config_is_locked_down(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    project.mkdir()
    request = parse_request(
        body(
            tmp_path,
            project_dir=str(project),
            project_dir_mount="/project",
            ncpus=2,
            memory_bytes=512 * 2**20,
            command=["run", "x"],
            env={"A": "1"},
        )
    )
    config = container_config(
        request, "img", owner_id="me", uid=1000, gid=1001, pids_limit=99, network_name="bridge"
    )
    host = config["HostConfig"]
    assert host["NanoCpus"] == 2_000_000_000
    assert host["Memory"] == host["MemorySwap"] == 512 * 2**20
    assert host["PidsLimit"] == 99
    assert host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["NetworkMode"] == "none"
    assert config["User"] == "1000:1001"
    assert config["Cmd"] == ["run", "x"]
    assert "A=1" in config["Env"]
    mounts = {m["Target"]: m for m in host["Mounts"]}
    assert mounts["/app"]["Source"] == str(tmp_path.resolve())
    assert mounts["/app"]["ReadOnly"] is False
    assert mounts["/project"]["ReadOnly"] is True
    assert config["Labels"][L.OWNER] == "me"
    assert config["Labels"][L.RESULT] == "r_0"
    assert config["Labels"][L.PROJECT] == "proj"
    assert config["Labels"][L.SLOT] == str(tmp_path.resolve())
    networked = parse_request(body(tmp_path, network=True))
    assert (
        container_config(
            networked, "img", owner_id="me", uid=0, gid=0, pids_limit=1, network_name="bridge"
        )["HostConfig"]["NetworkMode"]
        == "bridge"
    )
