"""Fuzzed slots through the real shim: no traceback, no hang, a clear message, a BOINC status.

Each slot gets a fuzzed ``init_data.xml`` or ``job.toml`` (content mutated, or
the file replaced by a FIFO, a link to ``/dev/zero``, a directory, a soft link
to any of those, a file over the cap...) and the shim is run in it as the BOINC
client runs it: ``python -m boincd_containers.shim`` in the slot, stderr into
stderr.txt, with no daemon on its socket. Slots come from a seed, so a run is
reproducible; each shim has a time bound (past it: a hang) and a 1 GiB address
space limit (a shim reading without a cap dies there, not the host).

CI runs the quick part. The figures in RELIABILITY.md come from:
    BOINCD_FUZZ_SEED=15 python -m tests.unit.test_shim_fuzz --slots 2000
(``--code DIR`` runs the shim from another checkout, e.g. the code before a fix).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("BOINCD_FUZZ_SEED", "15"))
QUICK_SLOTS = int(os.environ.get("BOINCD_FUZZ_SLOTS", "300"))
SLOW_SLOTS = 2000
# A shim that fails a task ends in about 0.1 s; one that reaches its main loop
# without a client ends within the unreachable limit plus a few seconds.
SLOT_TIMEOUT_S = 30.0
ADDRESS_SPACE_LIMIT = 1 << 30
WORKERS = 4  # shims mostly wait on their own start-up; 4 keep 2 cores busy
# pid_max is at most 2**22 on Linux: no process has this pid, so the shim
# sees its client gone at its first look and leaves at once.
DEAD_PID = 2**31 - 1
SHARED_MEM_SIZE = 8 * 1024
EXIT_INIT_FAILURE = 206

# The shim's __main__ under an address-space limit, imported from the code under
# test (-I -S: no site, no editable install that could point elsewhere). At exit
# it notes its peak RSS (VmHWM): wait4's ru_maxrss would include the parent's,
# which the child inherits across vfork and exec.
_BOOT = f"""
import atexit, resource, runpy, sys
code, rss_file = sys.argv[1:3]
sys.path.insert(0, code)
resource.setrlimit(resource.RLIMIT_AS, ({ADDRESS_SPACE_LIMIT}, {ADDRESS_SPACE_LIMIT}))

def _note_peak_rss():
    with open("/proc/self/status") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(rss_file, "w") as out:
        out.write(peak)

atexit.register(_note_peak_rss)
runpy.run_module("boincd_containers.shim", run_name="__main__", alter_sys=True)
"""

INIT_TEMPLATE = """<app_init_data>
<major_version>8</major_version>
<minor_version>2</minor_version>
<release>15</release>
<app_name>sciapp</app_name>
<project_preferences>
<ncpus>64</ncpus>
<result_name>not_this</result_name>
</project_preferences>
<project_dir>{project}</project_dir>
<boinc_dir>{boinc}</boinc_dir>
<wu_name>wu_1</wu_name>
<result_name>{result}</result_name>
<slot>{slot}</slot>
<client_pid>{pid}</client_pid>
<wu_cpu_time>0.000000</wu_cpu_time>
<checkpoint_period>60.000000</checkpoint_period>
<fraction_done_start>0.000000</fraction_done_start>
<fraction_done_end>1.000000</fraction_done_end>
<gpu_type></gpu_type>
<gpu_device_num>-1</gpu_device_num>
<gpu_usage>0.000000</gpu_usage>
<ncpus>1.000000</ncpus>
<rsc_memory_bound>536870912.000000</rsc_memory_bound>
<rsc_disk_bound>1000000000.000000</rsc_disk_bound>
<host_info>
    <p_ncpus>16</p_ncpus>
    <coprocs><coproc_cuda><gpu_type>other</gpu_type></coproc_cuda></coprocs>
</host_info>
<global_preferences><max_ncpus_pct>100.000000</max_ncpus_pct></global_preferences>
</app_init_data>
"""

JOB_TEMPLATE = 'image = "debian:12"\ncommand = ["/bin/true"]\nworkdir = "/app"\n'

WEIRD_NAMES = [
    "",
    " ",
    "wu_\u00e9t\u00e9_0",
    "\u7ed3\u679c_0",
    "r\x00x",
    "r\nx",
    "r\x1b[31mx",
    "r/../../x",
    "r?x=1",
    "r%2Fx",
    "r#x",
    "r x",
    "c;x",
    "\ud800",
    "r" * 255,
    "r" * 5000,
    "&amp;&lt;&#0;&#xD800;",
    "<![CDATA[x]]>",
]
WEIRD_NUMBERS = ["", "nan", "inf", "-inf", "1e999", "-1", "9" * 400, "0x10", "1_0", " 3 ", "\u0663"]
WEIRD_PATHS = [
    "",
    "/",
    "relative/dir",
    "/nonexistent/projects/x",
    "/home/a&b/projects/x",
    "/p/\u00e9",
    "/p/x\x01y",
    "/proc/self/root/proc/self/root",
    "/" + "d/" * 3000,
    "/dev/zero",
]
TOML_VALUES = [
    '"debian:12"',
    '""',
    '"\\u0000"',
    "true",
    "0",
    "-1",
    "3.5",
    "nan",
    "inf",
    "1979-05-27T07:32:00Z",
    "[]",
    "[1, 2]",
    '["a", 1]',
    "{}",
    '{ source = "x", target = "/x" }',
    '"""multi\nline"""',
    "'''lit\\eral'''",
    '"' + "x" * 5000 + '"',
    '"../../../../etc/passwd"',
    '"/etc"',
    '"fifo"',
    '"zero"',
    '"loop"',
    '"dir"',
    '"link_out"',
]
JOB_KEYS = [
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
    "imgae",
    "\u00e9",
    '"a.b"',
    "x" * 300,
]


@dataclass
class Slot:
    index: int
    path: Path
    what: str


@dataclass
class Outcome:
    slot: Slot
    returncode: int | None  # None: killed past the time bound
    seconds: float
    max_rss_kib: int
    stderr: str
    finish: str | None
    temporary_exit: bool
    problems: list[str] = field(default_factory=list)


class SlotMaker:
    """Builds fuzzed slots under ``root``, every choice drawn from one seeded generator."""

    def __init__(self, root: Path, seed: int) -> None:
        self.rng = random.Random(seed)
        self.root = root
        self.project = root / "projects" / "example.org_sci"
        self.project.mkdir(parents=True, exist_ok=True)
        (self.project / "job_v2.toml").write_text(JOB_TEMPLATE)
        (self.project / "img.tar").write_bytes(b"\0" * 1024)
        fifo = self.project / "fifo"
        if not fifo.exists():
            os.mkfifo(fifo)

    # -- contents ----------------------------------------------------------------

    def init_text(self, slot: int) -> str:
        return INIT_TEMPLATE.format(
            project=self.project, boinc=self.root, result=f"wu_1_{slot}", slot=slot, pid=DEAD_PID
        )

    def mutate_bytes(self, data: bytes) -> bytes:
        rng = self.rng
        for _ in range(rng.randint(1, 8)):
            if not data:
                data = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
                continue
            at = rng.randrange(len(data))
            op = rng.randrange(6)
            if op == 0:
                data = data[:at] + bytes([rng.randrange(256)]) + data[at + 1 :]
            elif op == 1:
                data = data[:at] + bytes(rng.randrange(256) for _ in range(8)) + data[at:]
            elif op == 2:
                data = data[:at] + data[at + rng.randint(1, 64) :]
            elif op == 3:
                end = min(len(data), at + rng.randint(1, 200))
                data = data[:end] + data[at:end] * rng.randint(1, 50) + data[end:]
            elif op == 4:
                data = data[:at]
            else:
                data = (
                    data[:at] + rng.choice([b"<", b">", b"&", b"]]>", b'"', b"[", b"{"]) + data[at:]
                )
        return data

    def fuzz_init(self, slot: int) -> tuple[str, bytes]:
        rng = self.rng
        text = self.init_text(slot)
        kind = rng.randrange(12)
        if kind == 0:
            return "bytes", self.mutate_bytes(text.encode())
        if kind == 1:
            name = rng.choice(WEIRD_NAMES)
            return f"result_name {name[:40]!a}", text.replace(f"wu_1_{slot}", name).encode(
                "utf-8", "surrogatepass"
            )
        if kind == 2:
            tag = rng.choice(["ncpus", "slot", "rsc_memory_bound", "gpu_device_num", "gpu_usage"])
            value = rng.choice(WEIRD_NUMBERS)
            start, end = text.rindex(f"<{tag}>"), text.rindex(f"</{tag}>")
            return f"<{tag}> {value[:20]!a}", (
                text[:start] + f"<{tag}>{value}" + text[end:]
            ).encode()
        if kind == 3:
            path = rng.choice([*WEIRD_PATHS, str(self.root / "slots" / str(slot) / "loop")])
            return f"project_dir {path[-30:]!a}", text.replace(str(self.project), path).encode()
        if kind == 4:
            # Unclosed tags, many of them: what made the old fallback scanner quadratic.
            tag = rng.choice(["ncpus", "host_info", "result_name", "project_preferences", "x"])
            n = rng.randint(1_000, 30_000)
            broken = text.replace("<wu_name>", "&<wu_name>")
            return f"{n} unclosed <{tag}>", broken.replace(
                "</app_init_data>", f"<{tag}>" * n + "</app_init_data>"
            ).encode()
        if kind == 5:
            n = rng.randint(100, 100_000)
            return f"{n} nested elements", text.replace(
                "<host_info>", "<host_info>" + "<a>" * n + "</a>" * n
            ).encode()
        if kind == 6:
            bomb = (
                '<!DOCTYPE app_init_data [<!ENTITY a "aaaaaaaaaa">'
                + "".join(
                    f'<!ENTITY {c} "&{p};&{p};&{p};&{p};&{p};&{p};&{p};&{p};">'
                    for p, c in zip("abcdefgh", "bcdefghi", strict=True)
                )
                + "]>\n"
            )
            return "entity expansion", (bomb + text.replace("sciapp", "&i;")).encode()
        if kind == 7:
            junk = rng.choice(["<!-- c -->", "<?pi x?>", "<![CDATA[<ncpus>9</ncpus>]]>", "&amp;"])
            return f"with {junk!a}", text.replace("<ncpus>1", junk + "<ncpus>1").encode()
        if kind == 8:
            return "wrong root", text.replace(
                "app_init_data", rng.choice(["foo", "APP_INIT_DATA"])
            ).encode()
        if kind == 9:
            pad = "<user_name>" + "x" * rng.randint(100_000, 2_000_000) + "</user_name>\n"
            return "large", text.replace("<wu_name>", pad + "<wu_name>").encode()
        if kind == 10:
            return "not UTF-8", text.encode().replace(b"sciapp", b"sci\xff\xfeapp")
        return "random bytes", bytes(rng.randrange(256) for _ in range(rng.randint(0, 2000)))

    def fuzz_job(self) -> tuple[str, bytes]:
        rng = self.rng
        kind = rng.randrange(8)
        if kind == 0:
            return "bytes", self.mutate_bytes(JOB_TEMPLATE.encode())
        if kind == 1:
            n = rng.randint(10, 50_000)
            opener, closer = rng.choice([("[", "]"), ("{a=", "}"), ("[{a=", "}]")])
            tail = closer * n if rng.random() < 0.7 else ""
            return f"{n} nested {opener}", (
                JOB_TEMPLATE + "x = " + opener * n + "1" + tail
            ).encode()
        if kind == 2:
            n = rng.randint(10, 5000)
            return f"{n} dotted keys", (JOB_TEMPLATE + "a" + ".a" * n + " = 1\n").encode()
        if kind == 3:
            return "not UTF-8", JOB_TEMPLATE.encode() + b'workdir2 = "\xc3\x28"\n'
        if kind == 4:
            return "random bytes", bytes(rng.randrange(256) for _ in range(rng.randint(0, 2000)))
        # A job made of keys and values drawn at random, often almost right.
        lines = []
        for _ in range(rng.randint(1, 6)):
            key = rng.choice(JOB_KEYS)
            value = rng.choice(TOML_VALUES)
            if key == "mount" and rng.random() < 0.7:
                value = (
                    "["
                    + ", ".join(
                        rng.choice(
                            [
                                '"fifo:/f"',
                                '"zero:/z"',
                                '"loop:/l"',
                                '"../x:/x"',
                                '"a\\u0000b:/x"',
                                '"dir:/d:ro"',
                                '"link_out:/o"',
                                '{ source = "dir", target = "/t" }',
                            ]
                        )
                        for _ in range(rng.randint(1, 3))
                    )
                    + "]"
                )
            lines.append(f"{key} = {value}")
        if rng.random() < 0.5:
            lines.insert(0, 'image = "debian:12"')
        return "keys " + "; ".join(line[:40] for line in lines), "\n".join(lines).encode()

    # -- how a file is placed in the slot --------------------------------------------

    def place(self, path: Path, content: bytes, cap: int) -> str:
        """Write ``content`` at ``path``, or put something hostile there instead."""
        rng = self.rng
        how = rng.randrange(20)
        if how == 0:
            os.mkfifo(path)
            return "a FIFO"
        if how == 1:
            path.symlink_to("/dev/zero")
            return "a symlink to /dev/zero"
        if how == 2:
            path.mkdir()
            return "a directory"
        if how == 3:
            path.symlink_to(path.name)
            return "a symlink loop"
        if how == 4:
            path.symlink_to(self.project / "fifo")
            return "a symlink to a FIFO"
        if how == 5:
            path.write_text(
                rng.choice(
                    [
                        "<soft_link>/dev/zero</soft_link>",
                        "<soft_link>../../projects/example.org_sci/fifo</soft_link>",
                        "<soft_link></soft_link>",
                        "<soft_link>\0</soft_link>",
                    ]
                )
            )
            return "a soft link to a FIFO or device"
        if how == 6:
            with open(path, "wb") as f:
                f.truncate(cap + 1)  # sparse: costs no disk
            return "over the cap"
        if how == 7:
            return "missing"
        path.write_bytes(content)
        return "a file"

    def slot(self, index: int) -> Slot:
        rng = self.rng
        path = self.root / "slots" / str(index)
        path.mkdir(parents=True)
        # Everything a valid task needs, so a slot that passes the checks runs on.
        (path / "boinc_mmap_file").write_bytes(b"\0" * SHARED_MEM_SIZE)
        os.mkfifo(path / "fifo")
        (path / "zero").symlink_to("/dev/zero")
        (path / "loop").symlink_to("loop")
        (path / "dir").mkdir()
        (path / "link_out").symlink_to("/etc")
        if rng.random() < 0.2:
            os.mkfifo(path / "fraction_done")
        init = self.init_text(index).encode()
        job = JOB_TEMPLATE.encode()
        if rng.random() < 0.5:
            what, init = self.fuzz_init(index)
            placed = self.place(path / "init_data.xml", init, 4 << 20)
            (path / "job.toml").write_bytes(job)
            label = f"init_data.xml {placed}: {what}"
        else:
            what, job = self.fuzz_job()
            (path / "init_data.xml").write_bytes(init)
            placed = self.place(path / "job.toml", job, 1 << 20)
            label = f"job.toml {placed}: {what}"
        return Slot(index, path, label)


def run_shim(slot: Slot, code_root: Path, socket_dir: Path) -> Outcome:
    """Run the shim in the slot as the client does; kill it past the time bound."""
    env = dict(os.environ)
    env.update(
        BOINCD_SOCKET=str(socket_dir / "no-daemon.sock"),
        BOINCD_SHIM_UNREACHABLE_S="0.5",
    )
    rss_file = slot.path.parent / f"{slot.index}.vmhwm"
    start = time.monotonic()
    with open(slot.path / "stderr.txt", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _BOOT, str(code_root), str(rss_file)],
            cwd=slot.path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    lock = threading.Lock()
    ended = False
    killed = False

    def kill() -> None:
        nonlocal killed
        with lock:
            if not ended:  # still ours: an unreaped child's pid cannot be reused
                killed = True
                os.kill(proc.pid, signal.SIGKILL)

    timer = threading.Timer(SLOT_TIMEOUT_S, kill)
    timer.start()
    try:
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        with lock:
            ended = True
    finally:
        timer.cancel()
    _, status = os.waitpid(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - start
    rss_file_text = rss_file.read_text() if rss_file.is_file() else "0"
    rss_file.unlink(missing_ok=True)
    stderr = (slot.path / "stderr.txt").read_text(errors="replace")
    finish_path = slot.path / "boinc_finish_called"
    finish = finish_path.read_text(errors="replace") if finish_path.is_file() else None
    return Outcome(
        slot=slot,
        returncode=None if killed else proc.returncode,
        seconds=seconds,
        max_rss_kib=int(rss_file_text or 0),
        stderr=stderr,
        finish=finish,
        temporary_exit=(slot.path / "boinc_temporary_exit").is_file(),
    )


def judge(outcome: Outcome) -> list[str]:
    """What is wrong with how the shim ended; empty when it ended as BOINC expects."""
    problems = []
    if outcome.returncode is None:
        return [f"hang: still running after {SLOT_TIMEOUT_S:.0f} s"]
    if "Traceback (most recent call last)" in outcome.stderr:
        problems.append("traceback")
    rc = outcome.returncode
    if rc == EXIT_INIT_FAILURE:
        lines = (outcome.finish or "").split("\n")
        if lines[0] != str(EXIT_INIT_FAILURE) or len(lines) < 2 or not lines[1].strip():
            problems.append(f"exit {rc} without a finish file naming it: {outcome.finish!r}")
        elif not any(f in lines[1] for f in ("init_data.xml", "job.toml", "boinc_mmap_file")):
            problems.append(f"message names no file: {lines[1]!r}")
        elif "internal error" in lines[1]:
            problems.append(f"a bug caught by the last resort: {lines[1]!r}")
        elif "(boincd-shim) error: " not in outcome.stderr:
            problems.append("no error line in stderr.txt")
    elif rc == 0:
        # A task that passed every check: the client is gone, or no daemon answers.
        if not (outcome.temporary_exit or "the client is gone" in outcome.stderr):
            problems.append("exit 0 without a reason BOINC knows")
    else:
        problems.append(f"exit status {rc}, not one the client expects here")
    return problems


@dataclass
class Figures:
    seed: int
    tried: int = 0
    failed_cleanly: int = 0  # exit 206 with a message naming the file
    ran_on: int = 0  # passed the checks and went on, exit 0
    tracebacks: int = 0
    hangs: int = 0
    other_problems: int = 0
    max_rss_kib: int = 0
    max_seconds: float = 0.0
    wall_seconds: float = 0.0
    bad: list[str] = field(default_factory=list)


def fuzz(count: int, seed: int, root: Path, code_root: Path = REPO) -> Figures:
    maker = SlotMaker(root, seed)
    slots = [maker.slot(i) for i in range(count)]
    figures = Figures(seed=seed)
    start = time.monotonic()

    def one(slot: Slot) -> Outcome:
        outcome = run_shim(slot, code_root, root)
        outcome.problems = judge(outcome)
        shutil.rmtree(slot.path, ignore_errors=True)
        return outcome

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        for outcome in pool.map(one, slots):
            figures.tried += 1
            figures.max_rss_kib = max(figures.max_rss_kib, outcome.max_rss_kib)
            figures.max_seconds = max(figures.max_seconds, outcome.seconds)
            if not outcome.problems:
                if outcome.returncode == EXIT_INIT_FAILURE:
                    figures.failed_cleanly += 1
                else:
                    figures.ran_on += 1
                continue
            if outcome.returncode is None:
                figures.hangs += 1
            elif "traceback" in outcome.problems:
                figures.tracebacks += 1
            else:
                figures.other_problems += 1
            tail = outcome.stderr.strip().splitlines()[-3:]
            figures.bad.append(
                f"slot {outcome.slot.index} ({outcome.slot.what}): "
                f"{', '.join(outcome.problems)}; stderr: {' | '.join(tail)[-400:]}"
            )
    figures.wall_seconds = time.monotonic() - start
    return figures


@pytest.fixture
def fuzz_root(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def _check(figures: Figures, count: int) -> None:
    assert figures.tried == count
    assert not figures.bad, f"seed {figures.seed}:\n" + "\n".join(figures.bad[:20])


def test_fuzzed_slots_fail_cleanly(fuzz_root: Path) -> None:
    count = max(QUICK_SLOTS, 300)
    _check(fuzz(count, SEED, fuzz_root), count)


@pytest.mark.slow
def test_many_fuzzed_slots_fail_cleanly(fuzz_root: Path, request: pytest.FixtureRequest) -> None:
    # A few minutes on 2 cores: only when asked for (pytest -m slow).
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("run with -m slow")
    _check(fuzz(SLOW_SLOTS, SEED + 1, fuzz_root), SLOW_SLOTS)


def test_a_bug_while_reading_a_slot_file_fails_the_task_with_a_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The last resort in __main__: an exception no check foresaw is one line in
    # stderr.txt and a failed task, not a traceback.
    from boincd_containers.shim import __main__ as shim_main

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("embedded null byte")

    maker = SlotMaker(tmp_path, SEED)
    slot = tmp_path / "slot"
    slot.mkdir()
    (slot / "init_data.xml").write_text(maker.init_text(0))
    monkeypatch.chdir(slot)
    monkeypatch.setattr(shim_main, "load_job", broken)
    assert shim_main.main() == EXIT_INIT_FAILURE
    finish = (slot / "boinc_finish_called").read_text().split("\n")
    assert finish[0] == str(EXIT_INIT_FAILURE)
    assert finish[1].startswith(
        "cannot use job.toml: internal error (ValueError at test_shim_fuzz.py:"
    )
    assert finish[1].endswith(": embedded null byte); please report it")
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "error: cannot use job.toml: internal error" in err


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slots", type=int, default=QUICK_SLOTS)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--code", type=Path, default=REPO, help="import the shim from here")
    parser.add_argument("--root", type=Path, help="build slots here (default: a temp dir)")
    args = parser.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory(dir=args.root) as root:
        figures = fuzz(args.slots, args.seed, Path(root), args.code.resolve())
    report = {k: v for k, v in vars(figures).items() if k != "bad"}
    print(json.dumps(report, indent=1))
    for line in figures.bad:
        print(line)
    return 1 if figures.bad else 0


if __name__ == "__main__":
    sys.exit(_main())
