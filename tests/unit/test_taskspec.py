from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from boincd_containers.core import labels as L
from boincd_containers.core.errors import BadRequest, Forbidden
from boincd_containers.job.spec import check_paths, container_config, parse_request


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
    checked = check_paths(ok, peer_uid=0)
    assert checked.ids == (os.getuid(), os.getgid())
    checked.close()
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


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("result", "r\ud800", "printable ASCII"),
        ("result", "r" * 100_000, "at most 255"),
        ("result", "caf\u00e9", "printable ASCII"),
        ("result", "a\tb", "printable ASCII"),
        ("result", "a/b", "without '/'"),
        ("result", "..", "without '/'"),
        ("project", "p/../x", "without '/'"),
        ("project", 5, "non-empty string"),
        ("slot_dir", "/tmp/a\0b", "NUL"),
        ("slot_dir", "/tmp/\udcff", "not valid Unicode"),
        ("slot_dir", ["/tmp"], "must be a string"),
        ("image", 3, "must be a string"),
        ("image", "x" * 5000, "at most"),
        ("workdir", {"a": 1}, "must be a string"),
        ("ncpus", "2", "must be a number"),
        ("ncpus", 1e300, "between"),
        ("ncpus", float("nan"), "between"),
        ("memory_bytes", 2**70, "between"),
        ("memory_bytes", -1, "between"),
        ("memory_bytes", False, "must be a number"),
        ("disk_bytes", float("inf"), "between"),
        ("gpu", {"device_num": "x"}, "whole number"),
        ("gpu", {"device_num": 1.5}, "whole number"),
        ("gpu", {"usage": "half"}, "must be a number"),
        ("gpu", {"usage": -1}, "between"),
        ("gpu", {"type": 7}, "must be a string"),
        ("gpu", {"colour": "x"}, "unknown gpu field"),
        ("gpu", [1], "wrong type"),
        ("mounts", [{"source": "a", "target": "/b", "read_only": "yes"}], "true or false"),
        ("mounts", [{"source": "a", "target": "/b", "x": 1}], "unknown mount field"),
        ("mounts", ["a:/b"], "string 'source' and 'target'"),
        ("mounts", {"source": "a"}, "wrong type"),
        ("env", {"A=B": "c"}, "bad name"),
        ("env", {"A": "\0"}, "NUL"),
        ("env", {"A": 1}, "strings to strings"),
        ("build_args", "x", "wrong type"),
        ("command", ["a"] * 5000, "at most 4096"),
        ("command", ["a\ud800"], "not valid Unicode"),
        ("priority", {"nice": "19"}, "priority"),
        ("build", "yes", "wrong type"),
        ("network", 1, "wrong type"),
    ],
)
def test_every_field_is_type_and_bound_checked(
    tmp_path: Path, field: str, value: Any, words: str
) -> None:
    # Before: many of these were 500s (int("x"), int(inf), surrogates reaching
    # paths and labels) or were accepted (a 100,000-character result name).
    with pytest.raises(BadRequest) as caught:
        parse_request(body(tmp_path, **{field: value}))
    assert words in caught.value.message
    caught.value.message.encode("ascii")  # ascii() of bad values: safe to log and send


def test_the_shims_requests_still_parse(tmp_path: Path) -> None:
    request = parse_request(
        body(
            tmp_path,
            result="wu_12.3-x_0",
            project="boinc.example.org_project",
            ncpus=0.01,
            memory_bytes=2.5e9,
            disk_bytes=0,
            gpu={"type": "NVIDIA", "device_num": 1, "usage": 0.5},
            mounts=[{"source": "in", "target": "/in", "read_only": True}],
            env={"A": "b c"},
            command=["sh", "-c", "echo é"],
            priority={"nice": 19, "idle": True},
            project_dir=None,
            build_args={},
        )
    )
    assert request.memory_bytes == 2_500_000_000
    assert request.gpu is not None
    assert request.gpu.usage == 0.5
    assert request.mounts[0].read_only is True
    assert request.result == "wu_12.3-x_0"
    long_name = "r" * 255
    assert parse_request(body(tmp_path, result=long_name)).result == long_name
