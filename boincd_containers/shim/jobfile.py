"""Read and check ``job.toml``, the project's description of a container task.

Keys of BOINC's docker_wrapper (samples/docker_wrapper/docker_wrapper.cpp,
``parse_config_file``) are accepted: ``workdir``, ``project_dir_mount``,
``image_name``, ``use_gpu``, ``mount`` (strings, each a ``docker -v`` argument),
``build_args`` (a string of ``docker build`` flags), ``verbose`` (0..2),
``web_graphics_guest_port`` (the container port BOINC Manager's "Show graphics"
opens, reached from the host on 127.0.0.1 only), and ``create_args``/``portmap``,
which are accepted but ignored with a warning. Errors name the file, the key,
what was wrong and what is allowed: a project admin reads them in the task's
stderr.txt.
"""

from __future__ import annotations

import os
import posixpath
import re
import tomllib
from pathlib import Path
from typing import Literal, NamedTuple

from .slotfiles import JOB_FILE_MAX_BYTES, SMALL_FILE_MAX_BYTES, read_slot_file

JOB_FILE = "job.toml"
DOCKERFILE = "Dockerfile"
_SOFT_LINK_MAX_BYTES = SMALL_FILE_MAX_BYTES
# Arrays and inline tables in one another; a job uses two or three.
MAX_NESTING = 32
_TOML_SPECIAL = re.compile(r"[\[\]{}#\"'\n,=]")
# Bodies of basic strings: escapes skipped, so an escaped quote does not end them.
_BASIC_BODY = re.compile(r'(?:[^"\\\n]+|\\.)*')
_LITERAL_BODY = re.compile(r"[^'\n]*")
_ML_BASIC_BODY = re.compile(r'(?:[^"\\]+|\\.|"(?!""))*', re.DOTALL)

ImageSource = Literal["load", "pull", "build"]


class JobError(Exception):
    """job.toml is missing or wrong; the message says how to fix it."""


class Mount(NamedTuple):
    source: str  # absolute host path, symlinks resolved, inside the slot or project dir
    target: str  # absolute path in the container
    read_only: bool

    def to_request(self) -> dict[str, object]:
        return {"source": self.source, "target": self.target, "read_only": self.read_only}


class JobSpec(NamedTuple):
    slot_dir: str
    project_dir: str | None
    image: str | None = None
    image_archive: str | None = None
    image_digest: str | None = None
    # Set whenever the slot has a Dockerfile: docker_wrapper builds it under
    # image_name when that image is absent, so a daemon may fall back to it.
    dockerfile: str | None = None
    command: tuple[str, ...] | None = None
    workdir: str = "/app"
    project_dir_mount: str | None = None
    use_gpu: bool = False
    network: bool = False
    fraction_done_filename: str = "fraction_done"
    checkpoint_filename: str | None = None
    mounts: tuple[Mount, ...] = ()
    build_args: tuple[tuple[str, str], ...] = ()
    verbose: int = 1
    # The container port serving the task's web graphics, or None.
    web_graphics_guest_port: int | None = None
    warnings: tuple[str, ...] = ()

    @property
    def source(self) -> ImageSource:
        if self.image_archive is not None:
            return "load"
        if self.image is not None:
            return "pull"
        return "build"

    def to_request(self) -> dict[str, object]:
        """The spec as JSON-able data for the daemon."""
        return {
            "source": self.source,
            "image": self.image,
            "image_archive": self.image_archive,
            "image_digest": self.image_digest,
            "dockerfile": self.dockerfile,
            "build_context": self.slot_dir if self.dockerfile is not None else None,
            "build_args": dict(self.build_args),
            "command": list(self.command) if self.command is not None else None,
            "workdir": self.workdir,
            "project_dir_mount": self.project_dir_mount,
            "use_gpu": self.use_gpu,
            "network": self.network,
            "mounts": [m.to_request() for m in self.mounts],
            "slot_dir": self.slot_dir,
            "project_dir": self.project_dir,
            "fraction_done_filename": self.fraction_done_filename,
            "checkpoint_filename": self.checkpoint_filename,
            "verbose": self.verbose,
            "web_graphics_guest_port": self.web_graphics_guest_port,
        }


_KNOWN_KEYS = frozenset(
    {
        "image",
        "image_name",
        "image_archive",
        "image_digest",
        "command",
        "workdir",
        "project_dir_mount",
        "use_gpu",
        "network",
        "fraction_done_filename",
        "checkpoint_filename",
        "mount",
        "build_args",
        "verbose",
        "create_args",
        "portmap",
        "web_graphics_guest_port",
    }
)
_IGNORED_KEYS = {
    "create_args": "engine flags are set by boincd-containers, never taken from a job",
    "portmap": (
        "task containers publish no ports; for the task's web graphics set "
        "web_graphics_guest_port (reached from this host on 127.0.0.1 only)"
    ),
}
PORT_MAX = 65535

# The reference grammar of distribution/reference: [domain[:port]/]path[:tag][@digest].
_DOMAIN = (
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*)"
)
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE_RE = re.compile(
    rf"^(?:{_DOMAIN}(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*"
    r"(?::[\w][\w.-]{0,127})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$"
)
_DIGEST_RE = re.compile(r"^(?:sha256:)?([0-9a-fA-F]{64})$")
_BUILD_ARG_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def resolve_soft_link(path: Path) -> Path:
    """Follow a BOINC soft-link file (``<soft_link>../../projects/P/F</soft_link>``).

    The client puts these in the slot instead of input files that are not
    copied (client/file_names.cpp make_soft_link); the target is relative to
    the slot. Anything else (a larger file, a directory, a FIFO) is returned
    unchanged, without reading more than a soft link's size of it.
    """
    try:
        head = read_slot_file(path, _SOFT_LINK_MAX_BYTES)
    except OSError:
        return path
    m = re.match(rb"\s*<soft_link>(.*?)</soft_link>", head, flags=re.DOTALL)
    if not m:
        return path
    target = m.group(1).decode("utf-8", errors="replace").strip()
    if not target or "\0" in target:
        return path
    return path.parent / target


def _resolve_dir(what: str, path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a NUL
        raise JobError(f"the {what} {str(path)!r} cannot be resolved: {exc}") from None


class _Checker:
    def __init__(self, file: str, slot_dir: Path, project_dir: Path | None) -> None:
        self.file = file
        self.slot = _resolve_dir("slot directory", slot_dir)
        self.project = (
            _resolve_dir("project directory (<project_dir> of init_data.xml)", project_dir)
            if project_dir is not None
            else None
        )

    def fail(self, key: str, problem: str) -> JobError:
        return JobError(f"{self.file}: {key}: {problem}")

    def string(self, key: str, value: object) -> str:
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string, not {_describe(value)}")
        if "\0" in value:
            raise self.fail(key, "must not contain a NUL character")
        return value

    def boolean(self, key: str, value: object) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, not {_describe(value)}")
        return value

    def container_path(self, key: str, value: object) -> str:
        text = self.string(key, value)
        if not text.startswith("/"):
            raise self.fail(key, f"{text!r} must be an absolute path in the container, like /app")
        if ":" in text or ".." in text.split("/"):
            raise self.fail(key, f"{text!r} must not contain ':' or '..'")
        norm = posixpath.normpath(text)
        if norm == "/":
            raise self.fail(key, "the container's root directory cannot be a mount point")
        return norm

    def slot_file_name(self, key: str, value: object) -> str:
        text = self.string(key, value)
        norm = posixpath.normpath(text) if text else ""
        if not text or text.startswith("/") or norm == "." or norm.split("/")[0] == "..":
            raise self.fail(
                key, f"{text!r} must be a file name relative to the slot directory, like 'progress'"
            )
        return norm

    def root_of(self, path: Path) -> Path | None:
        """The slot or project dir that ``path`` (already resolved) lies in."""
        for root in (self.slot, self.project):
            if root is not None and path.is_relative_to(root):
                return root
        return None

    def where(self) -> str:
        return "the slot directory" + (" or the project directory" if self.project else "")

    def host_path(self, key: str, text: str) -> Path:
        """Resolve a relative path from the slot; it must stay in the slot or project dir."""
        if not text:
            raise self.fail(key, "the path is empty")
        if text.startswith("/"):
            raise self.fail(
                key,
                f"{text!r} is absolute; give a path relative to the slot directory "
                f"(only {self.where()} may be used)",
            )
        candidate = resolve_soft_link(self.slot / text)
        try:
            real = candidate.resolve(strict=True)
        except FileNotFoundError:
            raise self.fail(key, f"{text!r} does not exist in the slot directory") from None
        except (OSError, RuntimeError, ValueError) as exc:
            raise self.fail(key, f"{text!r} cannot be resolved: {exc}") from None
        if self.root_of(real) is None:
            raise self.fail(key, f"{text!r} leads to {real}, outside {self.where()}")
        return real


def _mounts(chk: _Checker, value: object) -> tuple[Mount, ...]:
    if not isinstance(value, list):
        raise chk.fail("mount", f"must be a list, not {_describe(value)}")
    mounts: list[Mount] = []
    for i, item in enumerate(value):
        key = f"mount[{i}]"
        if isinstance(item, str):
            parts = chk.string(key, item).split(":")
            if len(parts) not in (2, 3):
                raise chk.fail(
                    key, f"{item!r} must look like 'SOURCE:TARGET' or 'SOURCE:TARGET:ro'"
                )
            source, target = parts[0], parts[1]
            mode = parts[2] if len(parts) == 3 else ""
            if mode not in ("ro", "rw", ""):
                raise chk.fail(key, f"mode {mode!r} in {item!r} must be 'ro' or 'rw'")
            read_only = mode == "ro"
            explicit_rw = mode == "rw"
        elif isinstance(item, dict):
            unknown = sorted(set(item) - {"source", "target", "read_only"})
            if unknown:
                raise chk.fail(
                    key, f"unknown key {unknown[0]!r}; allowed: source, target, read_only"
                )
            if "source" not in item or "target" not in item:
                raise chk.fail(key, "needs both 'source' and 'target'")
            source = chk.string(f"{key}.source", item["source"])
            target = item["target"]
            read_only = chk.boolean(f"{key}.read_only", item.get("read_only", False))
            explicit_rw = "read_only" in item and not read_only
        else:
            raise chk.fail(
                key, f"must be a string 'SOURCE:TARGET' or a table, not {_describe(item)}"
            )
        real = chk.host_path(key, source)
        if chk.root_of(real) != chk.slot:
            if explicit_rw:
                raise chk.fail(key, f"{source!r} is in the project directory, which is read-only")
            read_only = True
        mounts.append(Mount(str(real), chk.container_path(f"{key} target", target), read_only))
    return tuple(mounts)


def _build_args(chk: _Checker, value: object) -> tuple[tuple[str, str], ...]:
    pairs: list[tuple[str, str]] = []
    if isinstance(value, dict):
        for name, arg in value.items():
            pairs.append((name, chk.string(f"build_args.{name}", arg)))
    elif isinstance(value, str):
        # docker_wrapper appends this string to `docker build`; only --build-arg has
        # a meaning without a docker command line.
        import shlex  # here: most jobs have no build_args string

        try:
            tokens = shlex.split(value)
        except ValueError as exc:
            raise chk.fail("build_args", f"cannot be split into words: {exc}") from None
        it = iter(tokens)
        for tok in it:
            if tok == "--build-arg":
                spec = next(it, None)
                if spec is None:
                    raise chk.fail("build_args", "'--build-arg' at the end needs NAME=VALUE")
            elif tok.startswith("--build-arg="):
                spec = tok.removeprefix("--build-arg=")
            else:
                raise chk.fail(
                    "build_args",
                    f"{tok!r} is not supported; only '--build-arg NAME=VALUE' may be given "
                    '(or write build_args as a table: build_args = {{ NAME = "VALUE" }})',
                )
            name, eq, arg = spec.partition("=")
            if not eq:
                raise chk.fail("build_args", f"'--build-arg {spec}' needs NAME=VALUE")
            pairs.append((name, arg))
    else:
        raise chk.fail("build_args", f"must be a table or a string, not {_describe(value)}")
    for name, _ in pairs:
        if not _BUILD_ARG_NAME_RE.match(name):
            raise chk.fail("build_args", f"{name!r} is not a valid build argument name")
    return tuple(pairs)


def _image_archive(chk: _Checker, value: object) -> str:
    text = chk.string("image_archive", value)
    in_slot = os.path.lexists(chk.slot / text) if text else False
    if in_slot or chk.project is None or text.startswith("/") or not text:
        real = chk.host_path("image_archive", text)
    else:
        # An archive may be named as it lies in the project dir, not linked in the slot.
        try:
            real = (chk.project / text).resolve(strict=True)
        except (OSError, RuntimeError):
            raise chk.fail(
                "image_archive", f"{text!r} exists neither in the slot nor in the project directory"
            ) from None
        if chk.root_of(real) is None:
            raise chk.fail("image_archive", f"{text!r} leads to {real}, outside {chk.where()}")
    if not real.is_file():
        raise chk.fail(
            "image_archive", f"{text!r} is not a file (expected a `docker save` tarball)"
        )
    return str(real)


def _check_keys(chk: _Checker, data: dict[str, object]) -> list[str]:
    """Reject unknown keys; return warnings for the docker_wrapper keys we ignore."""
    unknown = []
    for key in sorted(k for k in data if k not in _KNOWN_KEYS):
        import difflib  # here: only a job with a mistake needs it

        close = difflib.get_close_matches(key, _KNOWN_KEYS, n=1)
        unknown.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    if unknown:
        # Every one at once: a project fixes its file in one round, not one per key.
        raise JobError(
            f"{chk.file}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"allowed keys: {', '.join(sorted(_KNOWN_KEYS))}"
        )
    if "image" in data and "image_name" in data:
        raise chk.fail("image", "give 'image' or its alias 'image_name', not both")
    if "create_args" in data:
        chk.string("create_args", data["create_args"])
    if "portmap" in data and not isinstance(data["portmap"], list):
        raise chk.fail("portmap", f"must be a list, not {_describe(data['portmap'])}")
    # The shim prefixes each warning with the file's name when it prints it.
    return [f"{k} is ignored: {why}" for k, why in _IGNORED_KEYS.items() if k in data]


def _image(chk: _Checker, data: dict[str, object]) -> str | None:
    key = "image" if "image" in data else "image_name"
    if key not in data:
        return None
    image = chk.string(key, data[key])
    if len(image) > 4096 or not _IMAGE_RE.match(image):
        raise chk.fail(
            key,
            f"{image!r} is not an image reference; expected e.g. 'debian:12', "
            "'registry.example.org:5000/science/app:1.2' or 'name@sha256:<hex>'",
        )
    return image


def _digest(chk: _Checker, data: dict[str, object]) -> str | None:
    if "image_digest" not in data:
        return None
    digest = chk.string("image_digest", data["image_digest"])
    m = _DIGEST_RE.match(digest)
    if not m:
        raise chk.fail("image_digest", f"{digest!r} must be 'sha256:' and 64 hex digits")
    if "image_archive" not in data:
        raise chk.fail(
            "image_digest",
            "checks an image_archive, and there is none; to pin a pulled image write "
            "image = 'name@sha256:<hex>'",
        )
    return "sha256:" + m.group(1).lower()


def _dockerfile(chk: _Checker) -> str | None:
    path = chk.slot / DOCKERFILE
    if not path.exists():
        return None
    real = resolve_soft_link(path).resolve()
    if chk.root_of(real) is None or not real.is_file():
        raise chk.fail(DOCKERFILE, f"the slot's Dockerfile leads to {real}, outside {chk.where()}")
    return str(real)


def _command(chk: _Checker, data: dict[str, object]) -> tuple[str, ...] | None:
    if "command" not in data:
        return None
    command = data["command"]
    if not isinstance(command, list):
        raise chk.fail("command", f"must be a list of strings, not {_describe(command)}")
    if not command:
        raise chk.fail("command", "is empty; leave it out to run the image's own command")
    return tuple(chk.string(f"command[{i}]", a) for i, a in enumerate(command))


def _web_graphics_port(chk: _Checker, data: dict[str, object]) -> int | None:
    if "web_graphics_guest_port" not in data:
        return None
    port = data["web_graphics_guest_port"]
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= PORT_MAX:
        raise chk.fail(
            "web_graphics_guest_port",
            f"must be a TCP port number from 1 to {PORT_MAX}, not {_describe(port)}",
        )
    return port


def _verbose(chk: _Checker, data: dict[str, object]) -> int:
    verbose = data.get("verbose", 1)
    if isinstance(verbose, bool):
        return int(verbose)
    if not isinstance(verbose, int) or not 0 <= verbose <= 2:
        raise chk.fail("verbose", f"must be 0, 1 or 2 (or true/false), not {_describe(verbose)}")
    return verbose


def parse_job(
    data: dict[str, object],
    slot_dir: str | Path,
    project_dir: str | Path | None = None,
    *,
    file: str = JOB_FILE,
) -> JobSpec:
    """Check parsed job.toml data; paths are resolved against the slot and project dirs."""
    chk = _Checker(file, Path(slot_dir), Path(project_dir) if project_dir is not None else None)
    warnings = _check_keys(chk, data)
    image = _image(chk, data)
    archive = _image_archive(chk, data["image_archive"]) if "image_archive" in data else None
    digest = _digest(chk, data)
    dockerfile = _dockerfile(chk)
    if image is None and archive is None and dockerfile is None:
        raise JobError(
            f"{file}: no image given: set 'image' (an image to pull), 'image_archive' "
            f"(a `docker save` tarball in the slot or project directory), or provide a "
            f"{DOCKERFILE} in the slot to build"
        )

    workdir = chk.container_path("workdir", data["workdir"]) if "workdir" in data else "/app"
    project_dir_mount = None
    if "project_dir_mount" in data:
        if chk.project is None:
            raise chk.fail("project_dir_mount", "the project directory is not known here")
        project_dir_mount = chk.container_path("project_dir_mount", data["project_dir_mount"])
        if project_dir_mount == workdir:
            raise chk.fail("project_dir_mount", "must differ from workdir")
    mounts = _mounts(chk, data["mount"]) if "mount" in data else ()
    taken = {workdir, project_dir_mount}
    for i, m in enumerate(mounts):
        if m.target in taken:
            raise chk.fail(f"mount[{i}]", f"target {m.target!r} is already a mount point")
        taken.add(m.target)

    checkpoint = data.get("checkpoint_filename")
    return JobSpec(
        slot_dir=str(chk.slot),
        project_dir=str(chk.project) if chk.project is not None else None,
        image=image,
        image_archive=archive,
        image_digest=digest,
        dockerfile=dockerfile,
        command=_command(chk, data),
        workdir=workdir,
        project_dir_mount=project_dir_mount,
        use_gpu=chk.boolean("use_gpu", data.get("use_gpu", False)),
        network=chk.boolean("network", data.get("network", False)),
        fraction_done_filename=chk.slot_file_name(
            "fraction_done_filename", data.get("fraction_done_filename", "fraction_done")
        ),
        checkpoint_filename=(
            chk.slot_file_name("checkpoint_filename", checkpoint)
            if checkpoint is not None
            else None
        ),
        mounts=mounts,
        build_args=_build_args(chk, data["build_args"]) if "build_args" in data else (),
        verbose=_verbose(chk, data),
        web_graphics_guest_port=_web_graphics_port(chk, data),
        warnings=tuple(warnings),
    )


def check_nesting(text: str, *, name: str = JOB_FILE, limit: int = MAX_NESTING) -> None:
    """Refuse TOML nested deeper than ``limit``, before tomllib sees it.

    tomllib parses arrays and inline tables by recursion, so a deep file ends
    in a RecursionError; and it checks every prefix of a dotted key
    (``a.b.c = 1``), so a long one takes memory and time quadratic in its
    parts (8,000 parts: 265 MB). One pass, no recursion, strings and comments
    skipped: brackets and braces are counted (table headers too, a ``[[x]]``
    is two: the bound only needs to be above anything a job uses), and dots
    between two separators (a newline, ``,``, ``=``, a bracket or a brace),
    which only a dotted key has more than one of. An unterminated string
    stops the scan: tomllib fails there too.
    """
    depth = 0
    dots = 0  # in the current key (or value) since the last separator
    pos = 0
    end = len(text)
    while True:
        m = _TOML_SPECIAL.search(text, pos)
        stop = end if m is None else m.start()
        dots += text.count(".", pos, stop)
        if dots > limit:
            raise JobError(
                f"{name}: a key with more than {limit} dotted parts "
                f"(line {text.count(chr(10), 0, stop) + 1}); a job's keys have one or two"
            )
        if m is None:
            return
        c = m.group()
        pos = stop + 1
        if c in "[{":
            depth += 1
            dots = 0
            if depth > limit:
                raise JobError(
                    f"{name}: arrays or inline tables nested more than {limit} levels deep "
                    f"(line {text.count(chr(10), 0, stop) + 1}); a job needs only a few"
                )
        elif c in "]}":
            depth = max(0, depth - 1)
            dots = 0
        elif c in "\n,=":
            dots = 0
        elif c == "#":
            nl = text.find("\n", stop)
            pos = end if nl < 0 else nl  # the newline ends the key too
        else:
            closed = _skip_string(text, stop, c)
            if closed is None:
                return
            pos = closed


def _skip_string(text: str, at: int, quote: str) -> int | None:
    """Where the TOML string starting at ``at`` ends, or None if it never does."""
    if text.startswith(quote * 3, at):
        if quote == '"':
            m = _ML_BASIC_BODY.match(text, at + 3)
            assert m is not None  # the pattern matches the empty string
            close = m.end()
        else:
            close = text.find("'''", at + 3)
        if close < 0 or not text.startswith(quote * 3, close):
            return None
        # Up to two quotes may end the content right before the delimiter.
        run = close + 3
        while run < len(text) and text[run] == quote and run - close < 5:
            run += 1
        return run
    # A one-line string: the body pattern stops at its quote or at the line's end.
    m = (_BASIC_BODY if quote == '"' else _LITERAL_BODY).match(text, at + 1)
    assert m is not None
    close = m.end()
    if close >= len(text) or text[close] != quote:
        return None
    return close + 1


def load_job(
    slot_dir: str | Path, project_dir: str | Path | None = None, *, name: str = JOB_FILE
) -> JobSpec:
    """Read ``job.toml`` (or a soft link to it) from the slot and check it."""
    path = resolve_soft_link(Path(slot_dir) / name)
    try:
        raw = read_slot_file(path, JOB_FILE_MAX_BYTES, name=name)
    except FileNotFoundError:
        raise JobError(
            f"no {name} in the slot directory {Path(slot_dir)}: the app version or workunit "
            f"must provide {name}, naming at least the image to run"
        ) from None
    except OSError as exc:  # read_slot_file's message names the file and the problem
        raise JobError(str(exc)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise JobError(f"{name} is not UTF-8 text") from None
    check_nesting(text, name=name)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise JobError(f"{name} is not valid TOML: {exc}") from None
    except RecursionError:
        # Only if the count above missed a way of nesting: still a clear no.
        raise JobError(f"{name}: values nested too deeply to parse") from None
    return parse_job(data, slot_dir, project_dir, file=name)
