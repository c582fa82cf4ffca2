"""init_data.xml as client 7.20 writes it (lib/app_ipc.cpp write_init_data_file)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from boincd_containers.shim.initdata import InitDataError, load_init_data, parse_init_data
from boincd_containers.shim.slotfiles import INIT_DATA_MAX_BYTES
from tests.unit.test_shim_slotfiles import within

# Shaped like the 7.20.5 client's output, including the nested blocks that
# reuse tag names an app must not confuse with the task's own.
SAMPLE = """<app_init_data>
<major_version>7</major_version>
<minor_version>20</minor_version>
<release>5</release>
<app_version>100</app_version>
<userid>0</userid>
<teamid>0</teamid>
<hostid>0</hostid>
<app_name>sciapp</app_name>
<project_preferences>
<ncpus>64</ncpus>
</project_preferences>
<project_dir>/var/lib/boinc/projects/example.org_science</project_dir>
<boinc_dir>/var/lib/boinc</boinc_dir>
<authenticator>abc</authenticator>
<wu_name>wu_1</wu_name>
<result_name>wu_1_0</result_name>
<shm_key>-1</shm_key>
<slot>3</slot>
<client_pid>4321</client_pid>
<wu_cpu_time>12.500000</wu_cpu_time>
<starting_elapsed_time>20.000000</starting_elapsed_time>
<using_sandbox>0</using_sandbox>
<vm_extensions_disabled>0</vm_extensions_disabled>
<user_total_credit>0.000000</user_total_credit>
<user_expavg_credit>0.000000</user_expavg_credit>
<host_total_credit>0.000000</host_total_credit>
<host_expavg_credit>0.000000</host_expavg_credit>
<resource_share_fraction>1.000000</resource_share_fraction>
<checkpoint_period>60.000000</checkpoint_period>
<fraction_done_start>0.000000</fraction_done_start>
<fraction_done_end>1.000000</fraction_done_end>
<gpu_type>NVIDIA</gpu_type>
<gpu_device_num>1</gpu_device_num>
<gpu_opencl_dev_index>1</gpu_opencl_dev_index>
<gpu_usage>0.500000</gpu_usage>
<ncpus>2.000000</ncpus>
<rsc_fpops_est>1000000000000.000000</rsc_fpops_est>
<rsc_fpops_bound>10000000000000.000000</rsc_fpops_bound>
<rsc_memory_bound>536870912.000000</rsc_memory_bound>
<rsc_disk_bound>1000000000.000000</rsc_disk_bound>
<computation_deadline>1700000000.000000</computation_deadline>
<vbox_window>0</vbox_window>
<no_priority_change>0</no_priority_change>
<process_priority>-1</process_priority>
<process_priority_special>-1</process_priority_special>
<host_info>
    <p_ncpus>16</p_ncpus>
    <coprocs>
        <coproc_cuda>
            <gpu_type>other</gpu_type>
        </coproc_cuda>
    </coprocs>
</host_info>
<global_preferences>
   <max_ncpus_pct>100.000000</max_ncpus_pct>
</global_preferences>
<app_file>boincd-shim</app_file>
</app_init_data>
"""


def test_parses_the_client_sample() -> None:
    data = parse_init_data(SAMPLE)
    assert data.result_name == "wu_1_0"
    assert data.wu_name == "wu_1"
    assert data.app_name == "sciapp"
    assert data.project_dir == "/var/lib/boinc/projects/example.org_science"
    assert data.project_name == "example.org_science"
    assert data.boinc_dir == "/var/lib/boinc"
    assert data.slot == 3
    assert data.ncpus == 2.0
    assert data.rsc_memory_bound == 536870912.0
    assert data.rsc_disk_bound == 1e9
    assert data.gpu_type == "NVIDIA"
    assert data.gpu_device_num == 1
    assert data.gpu_opencl_dev_index == 1
    assert data.gpu_usage == 0.5
    assert data.uses_gpu
    assert data.client_pid == 4321
    assert data.wu_cpu_time == 12.5
    assert data.starting_elapsed_time == 20.0
    assert data.checkpoint_period == 60.0
    assert data.client_version == (7, 20, 5)
    assert data.shm_key == -1


def test_defaults_follow_app_init_data_clear() -> None:
    data = parse_init_data(
        "<app_init_data><result_name>r</result_name>"
        "<project_dir>/p/proj</project_dir></app_init_data>"
    )
    assert data.gpu_type == ""
    assert data.gpu_device_num == -1
    assert data.gpu_opencl_dev_index == -1
    assert not data.uses_gpu
    assert data.checkpoint_period == 300.0
    assert data.fraction_done_end == 1.0
    assert data.ncpus == 0.0
    assert data.client_pid == 0


def test_no_docker_fields_needed() -> None:
    assert "docker" not in SAMPLE
    assert parse_init_data(SAMPLE).result_name == "wu_1_0"


def test_unescaped_ampersand_falls_back_to_a_lenient_scan() -> None:
    # The client writes project_dir unescaped: a strict XML parser rejects this.
    text = SAMPLE.replace(
        "/var/lib/boinc/projects/example.org_science", "/home/a&b/projects/x"
    ).replace("<user_total_credit>", "<user_name>Tom &amp; Jerry</user_name><user_total_credit>")
    data = parse_init_data(text)
    assert data.project_dir == "/home/a&b/projects/x"
    assert data.ncpus == 2.0  # not the 64 inside <project_preferences>
    assert data.gpu_type == "NVIDIA"  # not the one inside <host_info>
    assert data.result_name == "wu_1_0"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InitDataError, match=r"no init_data\.xml .*BOINC client"):
        load_init_data(tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "init_data.xml").write_text("\n")
    with pytest.raises(InitDataError, match="empty"):
        load_init_data(tmp_path)


@pytest.mark.parametrize("text", ["garbage", "<app_init_data><result_name>r</result"])
def test_garbled_file(text: str) -> None:
    with pytest.raises(InitDataError, match="app_init_data"):
        parse_init_data(text)


def test_wrong_root_element() -> None:
    with pytest.raises(InitDataError, match="root element is <foo>"):
        parse_init_data("<foo><result_name>r</result_name></foo>")


def test_missing_result_name() -> None:
    with pytest.raises(InitDataError, match="result_name"):
        parse_init_data(SAMPLE.replace("<result_name>wu_1_0</result_name>", ""))


def test_missing_project_dir() -> None:
    with pytest.raises(InitDataError, match="project_dir"):
        parse_init_data(SAMPLE.replace("<project_dir>", "<x>").replace("</project_dir>", "</x>"))


@pytest.mark.parametrize(
    ("tag", "value"), [("ncpus", "two"), ("slot", "x"), ("rsc_memory_bound", "inf")]
)
def test_bad_numbers_name_the_tag(tag: str, value: str) -> None:
    # The last occurrence is the top-level one.
    start = SAMPLE.rindex(f"<{tag}>")
    end = SAMPLE.rindex(f"</{tag}>")
    text = SAMPLE[:start] + f"<{tag}>{value}" + SAMPLE[end:]
    with pytest.raises(InitDataError, match=f"<{tag}> is '{value}'"):
        parse_init_data(text)


def test_load_from_slot(tmp_path: Path) -> None:
    (tmp_path / "init_data.xml").write_text(SAMPLE)
    assert load_init_data(tmp_path).slot == 3


# -- hostile slot files and names (issue 15) ------------------------------------------


def _load_error(slot: Path, fifo: Path | None = None) -> str:
    with pytest.raises(InitDataError) as info:
        within(fifo, lambda: load_init_data(slot))
    return str(info.value)


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "init_data.xml")
    message = _load_error(tmp_path, tmp_path / "init_data.xml")
    assert message == "init_data.xml is a FIFO (named pipe), not a regular file"


def test_link_to_dev_zero_is_refused(tmp_path: Path) -> None:
    (tmp_path / "init_data.xml").symlink_to("/dev/zero")
    assert _load_error(tmp_path) == "init_data.xml is a character device, not a regular file"


def test_over_the_cap_is_refused(tmp_path: Path) -> None:
    with open(tmp_path / "init_data.xml", "wb") as f:
        f.truncate(INIT_DATA_MAX_BYTES + 1)
    assert f"larger than {INIT_DATA_MAX_BYTES} bytes" in _load_error(tmp_path)


LENIENT = SAMPLE.replace("/var/lib/boinc/projects/", "/home/a&b/projects/")


@pytest.mark.parametrize(
    "filler",
    ["<proxy_info>", "<host_info>", "<shm_key>", "<project_preferences><x>"],
    ids=["unclosed-block", "block-after-block", "unclosed-wanted", "unclosed-mixed"],
)
def test_two_megabytes_of_unclosed_tags_parse_in_linear_time(filler: str) -> None:
    # The fallback scanner searched to the end of the file from every unclosed
    # tag: 200 KB took 16 s, 2 MB would take about half an hour. No timing
    # threshold here: the old scanner runs into the test timeout.
    repeat = (2 << 20) // len(filler)
    text = LENIENT.replace("<shm_key>-1</shm_key>", "").replace(
        "</app_init_data>", filler * repeat + "</app_init_data>"
    )
    assert len(text) > 2_000_000
    data = parse_init_data(text)
    assert data.project_dir == "/home/a&b/projects/example.org_science"
    assert (data.result_name, data.ncpus, data.gpu_type) == ("wu_1_0", 2.0, "NVIDIA")
    assert data.shm_key == 0


def test_two_megabytes_of_well_formed_xml(tmp_path: Path) -> None:
    deep = "<a>" * 200_000 + "</a>" * 200_000
    wide = "<user_name>" + "x" * 500_000 + "</user_name>"
    (tmp_path / "init_data.xml").write_text(
        SAMPLE.replace("<host_info>", "<host_info>" + deep + wide)
    )
    data = load_init_data(tmp_path)
    assert (data.result_name, data.gpu_type, data.ncpus) == ("wu_1_0", "NVIDIA", 2.0)


def test_entities_are_never_expanded() -> None:
    bomb = '<!DOCTYPE app_init_data [<!ENTITY a "aaaaaaaaaa">' + "".join(
        f'<!ENTITY {c} "{("&" + p + ";") * 10}">'
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    data = parse_init_data(bomb + "]>\n" + SAMPLE.replace("sciapp", "&i;"))
    assert data.app_name == "&i;"  # read as BOINC's own tag scanner reads it
    assert data.result_name == "wu_1_0"


def test_text_before_a_child_element_as_elementtree_read_it() -> None:
    text = SAMPLE.replace("<wu_name>wu_1</wu_name>", "<wu_name> w <b>x</b> y</wu_name>")
    assert parse_init_data(text).wu_name == "w"


@pytest.mark.parametrize(
    "name",
    [
        "wu_\u00e9t\u00e9_0",
        "\u7ed3\u679c",
        "r\x1b[31m",
        "r\tx",
        "r/../x",
        "r?x",
        "\ud800",
        "r" * 255,
    ],
    ids=["latin", "cjk", "escape", "tab", "slash", "query", "surrogate", "too-long"],
)
def test_result_names_boinc_cannot_have_are_refused(tmp_path: Path, name: str) -> None:
    raw = SAMPLE.replace("wu_1_0", name).encode("utf-8", "surrogatepass")
    (tmp_path / "init_data.xml").write_bytes(raw)
    message = _load_error(tmp_path)
    assert message.startswith("init_data.xml: <result_name>")
    assert "printable ASCII" in message or "at most 254" in message
    message.encode("ascii")  # the message itself is safe to print anywhere


@pytest.mark.parametrize("name", ["c;x", "c x", "r%41", "r#1", "r" * 254, "a-b_c.d~e"])
def test_printable_ascii_result_names_are_kept(name: str) -> None:
    assert parse_init_data(SAMPLE.replace("wu_1_0", name)).result_name == name


def test_control_character_in_project_dir() -> None:
    with pytest.raises(InitDataError, match=r"<project_dir> contains a control character"):
        parse_init_data(LENIENT.replace("/home/a&b", "/home/a&#1;b\x01"))
