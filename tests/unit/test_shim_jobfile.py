"""job.toml: docker_wrapper's keys, our keys, and the errors a project admin reads."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from boincd_containers.shim import jobfile
from boincd_containers.shim.jobfile import JobError, JobSpec, load_job, resolve_soft_link
from boincd_containers.shim.slotfiles import JOB_FILE_MAX_BYTES
from tests.unit.test_shim_slotfiles import within


@dataclass
class Dirs:
    slot: Path
    project: Path

    def job(self, text: str) -> JobSpec:
        (self.slot / "job.toml").write_text(text)
        return load_job(self.slot, self.project)

    def error(self, text: str) -> str:
        with pytest.raises(JobError) as info:
            self.job(text)
        return str(info.value)


@pytest.fixture
def dirs(tmp_path: Path) -> Dirs:
    # The client's layout: <data>/slots/N and <data>/projects/<url_dir>.
    slot = tmp_path / "slots" / "0"
    project = tmp_path / "projects" / "example.org_sci"
    slot.mkdir(parents=True)
    project.mkdir(parents=True)
    return Dirs(slot.resolve(), project.resolve())


def test_minimal_job_takes_the_defaults(dirs: Dirs) -> None:
    spec = dirs.job('image = "busybox:1.36"\n')
    assert spec.image == "busybox:1.36"
    assert spec.source == "pull"
    assert spec.workdir == "/app"
    assert spec.command is None
    assert spec.project_dir_mount is None
    assert not spec.use_gpu
    assert not spec.network
    assert spec.fraction_done_filename == "fraction_done"
    assert spec.checkpoint_filename is None
    assert spec.mounts == ()
    assert spec.build_args == ()
    assert spec.verbose == 1
    assert spec.warnings == ()
    assert spec.slot_dir == str(dirs.slot)
    assert spec.project_dir == str(dirs.project)


def test_full_job_and_its_request(dirs: Dirs) -> None:
    (dirs.slot / "data").mkdir()
    (dirs.project / "ref").mkdir()
    spec = dirs.job(
        """
image_name = "registry.example.org:5000/sci/app:2.1"
command = ["/bin/run", "--steps", "10"]
workdir = "/work/"
project_dir_mount = "/project"
use_gpu = true
network = true
fraction_done_filename = "progress/fd"
checkpoint_filename = "state.chk"
mount = ["data:/data", { source = "../../projects/example.org_sci/ref", target = "/ref" }]
build_args = { VERSION = "2" }
verbose = 2
"""
    )
    assert spec.workdir == "/work"
    assert spec.command == ("/bin/run", "--steps", "10")
    assert spec.checkpoint_filename == "state.chk"
    assert spec.fraction_done_filename == "progress/fd"
    request = spec.to_request()
    assert json.loads(json.dumps(request)) == request
    assert request == {
        "source": "pull",
        "image": "registry.example.org:5000/sci/app:2.1",
        "image_archive": None,
        "image_digest": None,
        "dockerfile": None,
        "build_context": None,
        "build_args": {"VERSION": "2"},
        "command": ["/bin/run", "--steps", "10"],
        "workdir": "/work",
        "project_dir_mount": "/project",
        "use_gpu": True,
        "network": True,
        "mounts": [
            {"source": str(dirs.slot / "data"), "target": "/data", "read_only": False},
            # Anything from the project dir is read-only.
            {"source": str(dirs.project / "ref"), "target": "/ref", "read_only": True},
        ],
        "slot_dir": str(dirs.slot),
        "project_dir": str(dirs.project),
        "fraction_done_filename": "progress/fd",
        "checkpoint_filename": "state.chk",
        "verbose": 2,
        "web_graphics_guest_port": None,
    }


def test_docker_wrapper_job_is_accepted(dirs: Dirs) -> None:
    # samples/docker_wrapper/test/job.toml plus the other keys its parser reads.
    (dirs.slot / "Dockerfile").write_text("FROM busybox\n")
    (dirs.slot / "out").mkdir()
    spec = dirs.job(
        """
project_dir_mount = "/project"
mount = ["out:/out:rw"]
build_args = "--build-arg A=1 --build-arg=B='two words'"
create_args = "--privileged"
portmap = ["8080:80"]
web_graphics_guest_port = 80
verbose = 1
"""
    )
    assert spec.source == "build"
    assert spec.dockerfile == str(dirs.slot / "Dockerfile")
    assert spec.to_request()["build_context"] == str(dirs.slot)
    assert spec.build_args == (("A", "1"), ("B", "two words"))
    assert spec.mounts[0].read_only is False
    # web_graphics_guest_port is a real key now; create_args and portmap stay ignored.
    assert spec.web_graphics_guest_port == 80
    assert len(spec.warnings) == 2
    assert any(w.startswith("create_args is ignored") for w in spec.warnings)
    assert any(w.startswith("portmap is ignored") for w in spec.warnings)


def test_image_with_a_dockerfile_pulls_but_keeps_the_dockerfile(dirs: Dirs) -> None:
    (dirs.slot / "Dockerfile").write_text("FROM busybox\n")
    spec = dirs.job('image = "sci"\n')
    assert spec.source == "pull"
    assert spec.dockerfile == str(dirs.slot / "Dockerfile")


def test_image_archive_in_slot_through_a_soft_link(dirs: Dirs) -> None:
    (dirs.project / "img_v1.tar").write_bytes(b"tar")
    # What the client writes for an input file that is not copied.
    (dirs.slot / "image.tar").write_text(
        "<soft_link>../../projects/example.org_sci/img_v1.tar</soft_link>\n"
    )
    spec = dirs.job(f'image_archive = "image.tar"\nimage_digest = "{"AB" * 32}"\n')
    assert spec.source == "load"
    assert spec.image_archive == str(dirs.project / "img_v1.tar")
    assert spec.image_digest == "sha256:" + "ab" * 32


def test_image_archive_by_its_name_in_the_project_dir(dirs: Dirs) -> None:
    (dirs.project / "img.tar").write_bytes(b"tar")
    spec = dirs.job('image_archive = "img.tar"\nimage = "sci:1"\n')
    assert spec.source == "load"
    assert spec.image == "sci:1"
    assert spec.image_archive == str(dirs.project / "img.tar")


def test_job_toml_itself_may_be_a_soft_link(dirs: Dirs) -> None:
    (dirs.project / "job_v2.toml").write_text('image = "sci:2"\n')
    (dirs.slot / "job.toml").write_text(
        "<soft_link>../../projects/example.org_sci/job_v2.toml</soft_link>\n"
    )
    assert load_job(dirs.slot, dirs.project).image == "sci:2"


def test_resolve_soft_link_leaves_other_files_alone(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("data")
    assert resolve_soft_link(plain) == plain
    assert resolve_soft_link(tmp_path / "absent") == tmp_path / "absent"


def test_missing_job_toml(dirs: Dirs) -> None:
    with pytest.raises(JobError, match=r"no job\.toml in the slot directory"):
        load_job(dirs.slot, dirs.project)


def test_invalid_toml_shows_the_line(dirs: Dirs) -> None:
    assert "not valid TOML" in dirs.error('image = "a"\nimage = "b"\n')
    assert "line 2" in dirs.error('image = "a"\nuse_gpu = yes\n')


def test_not_utf8(dirs: Dirs) -> None:
    (dirs.slot / "job.toml").write_bytes(b'image = "\xff"\n')
    with pytest.raises(JobError, match="UTF-8"):
        load_job(dirs.slot, dirs.project)


def test_unknown_key_suggests_and_lists(dirs: Dirs) -> None:
    msg = dirs.error('image = "a"\nuse_gpus = true\n')
    assert "job.toml: unknown key 'use_gpus' (did you mean 'use_gpu'?)" in msg
    assert "allowed keys:" in msg
    assert "fraction_done_filename" in msg


def test_unknown_table(dirs: Dirs) -> None:
    assert "unknown key 'resources'" in dirs.error('image = "a"\n[resources]\ncpus = 2\n')


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('use_gpu = "yes"', "use_gpu: must be true or false, not the string 'yes'"),
        ("network = 1", "network: must be true or false, not the integer 1"),
        ('command = "run.sh"', "command: must be a list of strings, not the string 'run.sh'"),
        ('command = ["run", 3]', "command[1]: must be a string, not the integer 3"),
        ("command = []", "command: is empty; leave it out"),
        ("workdir = 5", "workdir: must be a string, not the integer 5"),
        ('workdir = "app"', "workdir: 'app' must be an absolute path in the container"),
        ('workdir = "/"', "workdir: the container's root directory cannot be a mount point"),
        ('workdir = "/a/../b"', "workdir: '/a/../b' must not contain ':' or '..'"),
        ('project_dir_mount = "/app"', "project_dir_mount: must differ from workdir"),
        ("verbose = 7", "verbose: must be 0, 1 or 2"),
        ('fraction_done_filename = "/tmp/fd"', "fraction_done_filename: '/tmp/fd' must be"),
        ('checkpoint_filename = "../x"', "checkpoint_filename: '../x' must be a file name"),
        ("build_args = 3", "build_args: must be a table or a string, not the integer 3"),
        ('build_args = "--network host"', "build_args: '--network' is not supported"),
        ('build_args = "--build-arg A"', "build_args: '--build-arg A' needs NAME=VALUE"),
        ('build_args = { "A-B" = "1" }', "build_args: 'A-B' is not a valid build argument name"),
        ("build_args = { A = 1 }", "build_args.A: must be a string, not the integer 1"),
        ("web_graphics_guest_port = true", "web_graphics_guest_port: must be a TCP port"),
        ("web_graphics_guest_port = 0", "from 1 to 65535, not the integer 0"),
        ("web_graphics_guest_port = 65536", "from 1 to 65535, not the integer 65536"),
        ('web_graphics_guest_port = "80"', "not the string '80'"),
        ('portmap = "80:80"', "portmap: must be a list"),
        ('image_digest = "sha256:abc"', "image_digest: 'sha256:abc' must be 'sha256:' and 64"),
        (f'image_digest = "{"a" * 64}"', "image_digest: checks an image_archive"),
    ],
)
def test_wrong_values_explain_themselves(dirs: Dirs, line: str, expected: str) -> None:
    msg = dirs.error(f'image = "sci"\n{line}\n')
    assert msg.startswith("job.toml: ")
    assert expected in msg


@pytest.mark.parametrize("image", ["Sci/App", "sci app", "sci:", "-sci", "sci@sha256:xyz", ""])
def test_bad_image_references(dirs: Dirs, image: str) -> None:
    assert "is not an image reference" in dirs.error(f'image = "{image}"\n')


@pytest.mark.parametrize(
    "image",
    ["busybox", "localhost:5000/busybox:1.36", "ghcr.io/a/b-c_d", f"sci@sha256:{'a' * 64}"],
)
def test_good_image_references(dirs: Dirs, image: str) -> None:
    assert dirs.job(f'image = "{image}"\n').image == image


def test_image_and_image_name_together(dirs: Dirs) -> None:
    assert "not both" in dirs.error('image = "a"\nimage_name = "b"\n')


def test_no_image_at_all(dirs: Dirs) -> None:
    msg = dirs.error("use_gpu = true\n")
    assert "no image given" in msg
    assert "Dockerfile" in msg


def test_image_archive_outside_is_refused(dirs: Dirs, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.tar"
    outside.write_bytes(b"tar")
    (dirs.slot / "img.tar").symlink_to(outside)
    assert "outside the slot directory or the project directory" in dirs.error(
        'image_archive = "img.tar"\n'
    )
    assert "is absolute" in dirs.error(f'image_archive = "{outside}"\n')
    assert "exists neither in the slot nor in the project" in dirs.error(
        'image_archive = "nope.tar"\n'
    )
    (dirs.slot / "adir").mkdir()
    assert "is not a file" in dirs.error('image_archive = "adir"\n')


class TestMounts:
    def test_absolute_source_is_refused(self, dirs: Dirs) -> None:
        msg = dirs.error('image = "a"\nmount = ["/etc:/etc"]\n')
        assert "job.toml: mount[0]: '/etc' is absolute" in msg

    def test_dotdot_escape_is_refused(self, dirs: Dirs) -> None:
        (dirs.slot.parent / "1").mkdir()
        msg = dirs.error('image = "a"\nmount = ["../1:/other"]\n')
        assert "'../1' leads to" in msg
        assert "outside the slot directory or the project directory" in msg

    def test_symlink_escape_is_refused(self, dirs: Dirs, tmp_path: Path) -> None:
        (dirs.slot / "sneaky").symlink_to("/etc")
        assert "'sneaky' leads to /etc, outside" in dirs.error(
            'image = "a"\nmount = ["sneaky:/x"]\n'
        )

    def test_symlink_inside_is_followed(self, dirs: Dirs) -> None:
        (dirs.slot / "real").mkdir()
        (dirs.slot / "alias").symlink_to(dirs.slot / "real")
        spec = dirs.job('image = "a"\nmount = ["alias:/x:ro"]\n')
        assert spec.mounts[0].source == str(dirs.slot / "real")
        assert spec.mounts[0].read_only

    def test_missing_source(self, dirs: Dirs) -> None:
        assert "'out' does not exist in the slot directory" in dirs.error(
            'image = "a"\nmount = ["out:/out"]\n'
        )

    def test_project_dir_cannot_be_mounted_writable(self, dirs: Dirs) -> None:
        assert "which is read-only" in dirs.error(
            'image = "a"\nmount = ["../../projects/example.org_sci:/p:rw"]\n'
        )
        assert "which is read-only" in dirs.error(
            'image = "a"\nmount = [{ source = "../../projects/example.org_sci", '
            'target = "/p", read_only = false }]\n'
        )

    @pytest.mark.parametrize(
        ("item", "expected"),
        [
            ('"data"', "must look like 'SOURCE:TARGET'"),
            ('"data:/d:z"', "mode 'z' in 'data:/d:z' must be 'ro' or 'rw'"),
            ('"data:rel"', "mount[0] target: 'rel' must be an absolute path"),
            ('"data:/app"', "target '/app' is already a mount point"),
            ("3", "must be a string 'SOURCE:TARGET' or a table, not the integer 3"),
            ('{ source = "data" }', "needs both 'source' and 'target'"),
            ('{ source = "data", target = "/d", mode = "ro" }', "unknown key 'mode'"),
            ('{ source = "data", target = "/d", read_only = "no" }', "read_only: must be true"),
            (':"/d"', "must be a list"),
        ],
    )
    def test_malformed(self, dirs: Dirs, item: str, expected: str) -> None:
        (dirs.slot / "data").mkdir()
        text = (
            f'image = "a"\nmount = [{item}]\n'
            if not item.startswith(":")
            else (f'image = "a"\nmount = {item[1:]}\n')
        )
        assert expected in dirs.error(text)

    def test_duplicate_targets(self, dirs: Dirs) -> None:
        (dirs.slot / "a").mkdir()
        (dirs.slot / "b").mkdir()
        assert "mount[1]: target '/x' is already a mount point" in dirs.error(
            'image = "a"\nmount = ["a:/x", "b:/x/"]\n'
        )


def test_slot_dir_is_resolved(tmp_path: Path) -> None:
    real = tmp_path / "real_slot"
    real.mkdir()
    link = tmp_path / "slot_link"
    link.symlink_to(real)
    (real / "job.toml").write_text('image = "a"\n')
    spec = load_job(link)
    assert spec.slot_dir == str(real.resolve())
    assert spec.project_dir is None
    assert os.path.isdir(spec.slot_dir)


def test_project_dir_mount_needs_a_project_dir(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text('image = "a"\nproject_dir_mount = "/p"\n')
    with pytest.raises(JobError, match="project directory is not known"):
        load_job(tmp_path)


# -- hostile slot files (issue 15): refused with a clear message, never read blindly --


def _load_within(dirs: Dirs, fifo: Path | None = None) -> str:
    """The JobError message; a load that blocks (on a FIFO) fails the test instead."""
    with pytest.raises(JobError) as info:
        within(fifo, lambda: load_job(dirs.slot, dirs.project))
    return str(info.value)


def test_job_toml_linked_to_dev_zero_is_refused(dirs: Dirs) -> None:
    # The shim used to read /dev/zero until the host ran out of memory.
    (dirs.slot / "job.toml").symlink_to("/dev/zero")
    assert _load_within(dirs) == "job.toml is a character device, not a regular file"


def test_job_toml_fifo_is_refused_without_blocking(dirs: Dirs) -> None:
    os.mkfifo(dirs.slot / "job.toml")
    message = _load_within(dirs, dirs.slot / "job.toml")
    assert message == "job.toml is a FIFO (named pipe), not a regular file"


def test_job_toml_soft_link_to_a_fifo_or_device(dirs: Dirs) -> None:
    os.mkfifo(dirs.project / "job_fifo.toml")
    (dirs.slot / "job.toml").write_text(
        "<soft_link>../../projects/example.org_sci/job_fifo.toml</soft_link>\n"
    )
    assert "FIFO" in _load_within(dirs, dirs.project / "job_fifo.toml")
    (dirs.slot / "job.toml").write_text("<soft_link>/dev/zero</soft_link>\n")
    assert "character device" in _load_within(dirs)


def test_job_toml_that_is_a_directory(dirs: Dirs) -> None:
    (dirs.slot / "job.toml").mkdir()
    assert _load_within(dirs) == "job.toml is a directory, not a regular file"


def test_job_toml_over_the_cap(dirs: Dirs) -> None:
    with open(dirs.slot / "job.toml", "wb") as f:
        f.truncate(JOB_FILE_MAX_BYTES + 1)  # sparse: no disk used
    assert f"larger than {JOB_FILE_MAX_BYTES} bytes" in _load_within(dirs)


@pytest.mark.parametrize(
    "value",
    ["[" * 100_000 + "]" * 100_000, "{a=" * 5_000 + "1" + "}" * 5_000, "[{a=" * 3_000 + "1"],
    ids=["arrays", "inline-tables", "mixed-unclosed"],
)
def test_deep_nesting_is_refused_not_a_recursion_error(dirs: Dirs, value: str) -> None:
    message = dirs.error('image = "debian:12"\nx = ' + value + "\n")
    assert message == (
        "job.toml: arrays or inline tables nested more than 32 levels deep (line 2); "
        "a job needs only a few"
    )


def test_long_dotted_key_is_refused_before_tomllib(dirs: Dirs) -> None:
    # tomllib checks every prefix of a dotted key: 20,000 parts took 1.6 GB and 22 s.
    message = dirs.error('image = "debian:12"\n' + "a" + ".a" * 20_000 + " = 1\n")
    assert message.startswith("job.toml: a key with more than 32 dotted parts (line 2)")
    message = dirs.error("[" + "t." * 40 + "t]\n")
    assert "dotted parts" in message


def test_nesting_below_the_bound_and_brackets_in_strings_are_fine(dirs: Dirs) -> None:
    spec = dirs.job(
        'image = "debian:12"  # [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n'
        'command = ["[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[{{{{{{{{{{{{{{{{{", '
        "'[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[', "
        '"""\n[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\\"""[[[[[[[[[[[[[[[[[[[[""""", '
        "'''[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[''''', "
        '"a.b.c.d.e.f.g.h.i.j.k.l.m.n.o.p.q.r.s.t.u.v.w.x.y.z.a.b.c.d.e.f.g.h.i.j"]\n'
        "[build_args]\n" + "\n".join(f"A{i} = '{'.' * 50}'" for i in range(3)) + "\n"
    )
    assert spec.command is not None
    assert len(spec.command) == 5
    with pytest.raises(JobError, match="unknown key 'x'"):
        dirs.job('image = "debian:12"\nx = ' + "[" * 30 + "]" * 30 + "\n")


def test_recursion_error_is_still_a_clear_message(
    dirs: Dirs, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Should the bound above ever miss a way of nesting, tomllib's RecursionError
    # still becomes a job.toml message.
    monkeypatch.setattr(jobfile, "check_nesting", lambda text, name: None)
    message = dirs.error('image = "debian:12"\nx = ' + "[" * 100_000 + "]" * 100_000 + "\n")
    assert message == "job.toml: values nested too deeply to parse"


def test_nul_in_a_mount_string_is_a_clear_message(dirs: Dirs) -> None:
    message = dirs.error('image = "debian:12"\nmount = ["a\\u0000b:/x"]\n')
    assert message.startswith("job.toml: mount[0]")


def test_a_project_dir_in_a_symlink_loop_is_a_clear_message(dirs: Dirs) -> None:
    (dirs.slot / "job.toml").write_text('image = "debian:12"\n')
    (dirs.slot / "loop").symlink_to("loop")
    with pytest.raises(
        JobError,
        match=r"the project directory \(<project_dir> of init_data\.xml\) .*loop' cannot be",
    ):
        load_job(dirs.slot, dirs.slot / "loop")


def test_every_unknown_key_is_named_at_once(dirs: Dirs) -> None:
    msg = dirs.error('image = "a"\ncomand = ["x"]\nbogus = 1\n')
    assert "unknown keys 'bogus', 'comand' (did you mean 'command'?)" in msg


def test_web_graphics_guest_port_is_kept_and_portmap_is_refused_with_the_way_out(
    dirs: Dirs,
) -> None:
    spec = dirs.job('image = "sci"\nweb_graphics_guest_port = 8080\n')
    assert spec.web_graphics_guest_port == 8080
    assert spec.warnings == ()
    assert dirs.job('image = "sci"\n').web_graphics_guest_port is None
    spec = dirs.job('image = "sci"\nportmap = ["8080:80"]\n')
    (warning,) = spec.warnings
    assert warning.startswith("portmap is ignored: task containers publish no ports")
    assert "web_graphics_guest_port" in warning
