"""`boincd-containers ctl`: what the daemon is doing, for volunteers (standard library only).

Human output is a few aligned tables; `--json` prints the daemon's answer as
exactly one JSON object on stdout. Errors go to stderr, with an exit status a
script can act on (see EXIT_*). Nothing heavy is imported: `ctl status` must
answer in a blink, and works where the daemon's dependencies are not installed.
"""

from __future__ import annotations

import argparse
import grp
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from boincd_containers.shim.client import DaemonClient, DaemonError, DaemonUnreachable, socket_path

EXIT_OK = 0
EXIT_DAEMON_ERROR = 1  # the daemon answered, with an error
EXIT_NOT_RUNNING = 3  # nothing answers on the socket
EXIT_NO_PERMISSION = 4  # the socket is there, but this user may not open it
EXIT_ENGINE_UNREACHABLE = 5  # `status`: the daemon answers, but has no container engine


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def human_seconds(s: float | None) -> str:
    """CPU time as a volunteer reads it: 42.1s, 5m03s, 2h05m."""
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    minutes, seconds = divmod(int(s), 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _short_id(value: str | None) -> str:
    return (value or "").removeprefix("sha256:")[:12]


# -- tasks ----------------------------------------------------------------------------


def _tasks_text(tasks: list[dict[str, Any]]) -> str:
    if not tasks:
        return "tasks    none"
    rows = []
    notes = []
    for t in sorted(tasks, key=lambda t: (str(t.get("project")), str(t.get("result")))):
        state = str(t.get("state") or "-")
        if t.get("interrupted"):
            state += " (interrupted)"
        elif t.get("detached") and state == "paused":
            state += " (quit)"
        rx, tx = t.get("rx_bytes"), t.get("tx_bytes")
        # Slot dir + writable layer + volumes against BOINC's disk bound (watch/limits.py).
        used, bound = t.get("disk_used_bytes"), t.get("disk_bound_bytes")
        disk = f"{human_bytes(used)} / {human_bytes(bound)}" if bound else human_bytes(used)
        rows.append(
            (
                t.get("project"),
                t.get("result"),
                state,
                # Not sampled yet (never ran): unknown, not zero.
                human_seconds(t.get("cpu_time_s")) if t.get("sampled_at") else "-",
                human_bytes(t.get("memory_bytes")) if t.get("sampled_at") else "-",
                f"{human_bytes(rx)} / {human_bytes(tx)}" if rx or tx else "-",
                disk,
                _gpu_cell(t),
                _short_id(t.get("container_id")) or "-",
            )
        )
        error, limit = t.get("error"), t.get("limit_exceeded")
        if isinstance(limit, dict) and limit.get("message"):
            notes.append(f"  {t.get('result')}: stopped, {limit['message']}")
        elif isinstance(error, dict) and error.get("message"):
            notes.append(f"  {t.get('result')}: {error['message']}")
        elif t.get("progress"):
            notes.append(f"  {t.get('result')}: {t['progress']}")
    headers = (
        "PROJECT", "RESULT", "STATE", "CPU", "MEMORY", "NET RX / TX", "DISK / BOUND", "GPU",
        "CONTAINER",
    )  # fmt: skip
    return "\n".join([table(headers, rows), *notes])


def _gpu_cell(task: dict[str, Any]) -> str:
    """`0.5 GPU-8f6d4f2e`: the share and the card's short UUID (unique like a short id)."""
    uuids = task.get("gpus") or []
    if not uuids:
        return "-"
    usage = task.get("gpu_usage") or 0
    share = f"{usage:g} " if 0 < usage < 1 else ""
    return share + ",".join(str(g)[:12] for g in uuids)


# -- images and volumes -----------------------------------------------------------------


def _project_rows(projects: Any) -> list[tuple[str, Any, Any, Any]]:
    """(project, images, bytes used, bytes only it uses), whichever shape the daemon
    sends: {name: {...}} or [{"project": name, ...}]."""
    if isinstance(projects, dict):
        items = [(str(name), v) for name, v in projects.items() if isinstance(v, dict)]
    elif isinstance(projects, list):
        items = [(str(p.get("project")), p) for p in projects if isinstance(p, dict)]
    else:
        return []
    return [
        (
            name,
            v.get("images", v.get("count")),
            v.get("used_bytes", v.get("bytes")),
            v.get("exclusive_bytes", v.get("unique_bytes")),
        )
        for name, v in sorted(items)
    ]


def _images_text(images: dict[str, Any], brief: bool = False) -> str:
    """`brief` (for status): only images BOINC tasks use or the daemon brought;
    the volunteer's other images are summed up in one line."""
    head = (
        f"images   {images.get('count', 0)}, {human_bytes(images.get('total_bytes'))} on disk"
        " (shared layers counted once)"
    )
    if images.get("reclaimable_bytes") is not None:
        head += f", {human_bytes(images['reclaimable_bytes'])} reclaimable"
    if images.get("budget_bytes"):
        head += f", budget {human_bytes(images['budget_bytes'])}"
    parts = [head]
    items = [i for i in images.get("items") or [] if isinstance(i, dict)]
    others: list[dict[str, Any]] = []
    if brief:
        others = [i for i in items if not (i.get("ours") or i.get("projects") or i.get("pinned"))]
        items = [i for i in items if i not in others]
    rows = [
        (
            i.get("ref") or "<none>",
            _short_id(i.get("id")),
            human_bytes(i.get("size_bytes")),
            human_bytes(i.get("unique_bytes")),
            human_bytes(i.get("shared_bytes")),
            ",".join(i.get("projects") or []) or "-",
            "yes" if i.get("pinned") else "",
            # The daemon only ever evicts what it brought; the volunteer's own images stay.
            "-" if i.get("ours") is None else "boincd" if i["ours"] else "other",
        )
        for i in items
    ]
    if rows:
        headers = ("IMAGE", "ID", "SIZE", "UNIQUE", "SHARED", "PROJECTS", "IN USE", "BROUGHT BY")
        parts.append(table(headers, rows))
    if others:
        parts.append(_others_line(others, besides=bool(rows)))
    for op in images.get("in_progress") or []:
        waiting = f" ({op['tasks']} task(s) waiting)" if op.get("tasks") else ""
        parts.append(f"  {op.get('what')}: {op.get('progress') or 'starting'}{waiting}")
    if images.get("error"):
        parts.append(f"warning: image accounting: {images['error']}")
    projects = _project_rows(images.get("projects"))
    if projects:
        parts += [
            "",
            table(
                ("PROJECT", "IMAGES", "IMAGE DISK", "ONLY ITS OWN"),
                [(p, n, human_bytes(used), human_bytes(own)) for p, n, used, own in projects],
            ),
        ]
    return "\n".join(parts)


def _others_line(others: list[dict[str, Any]], besides: bool) -> str:
    """`and 1 other image ...` under the table; without a table there is no "other"."""
    n = len(others)
    own = human_bytes(sum(i.get("unique_bytes") or 0 for i in others))
    noun = "image" if n == 1 else "images"
    lead = f"and {n} other {noun}" if besides else f"{n} {noun}"
    whose = "its" if n == 1 else "their"
    lists = "lists it" if n == 1 else "lists them"
    return f"  {lead} no BOINC task uses ({own} of {whose} own); `ctl images` {lists}"


def _volumes_text(volumes: dict[str, Any]) -> str:
    return f"volumes  {volumes.get('count', 0)}, {human_bytes(volumes.get('total_bytes'))}"


# -- GPUs ---------------------------------------------------------------------------


def _gpus_text(gpus: dict[str, Any]) -> str:
    devices = gpus.get("devices") or []
    shares = gpus.get("shares") or []
    parts = []
    if devices:
        rows: list[tuple[Any, ...]] = [
            (
                f"{str(d.get('vendor', '')).upper()} {d.get('boinc_num', d.get('index'))}",
                d.get("name"),
                d.get("uuid"),
                f"{human_bytes(d.get('memory_used_bytes'))} / "
                f"{human_bytes(d.get('memory_total_bytes'))}",
                "-" if d.get("utilisation_percent") is None else f"{d['utilisation_percent']}%",
                f"{float(d.get('allocated') or 0):.0%}",
                len(d.get("tasks") or []),
            )
            for d in devices
        ]
        parts.append(table(("GPU", "NAME", "UUID", "MEMORY", "UTIL", "SHARED", "TASKS"), rows))
    else:
        parts.append("GPUs     none found")
    if shares:
        rows = [
            (
                s.get("result"),
                ",".join(str(n) for n in s.get("boinc_nums") or []) or ",".join(s.get("gpus", [])),
                f"{float(s.get('usage') or 0):g}",
                human_bytes(s.get("budget_bytes")) if s.get("budget_bytes") else "-",
                human_bytes(s.get("used_bytes")),
                "OVER BUDGET" if s.get("over_budget") else "",
            )
            for s in shares
        ]
        parts += ["", table(("TASK", "GPU", "SHARE", "MEMORY BUDGET", "USED", ""), rows)]
    parts += [f"warning: {e}" for e in gpus.get("errors") or []]
    return "\n".join(parts)


# -- status -------------------------------------------------------------------------


def _engine_line(engine: dict[str, Any]) -> str:
    if not engine.get("reachable"):
        return f"engine   unavailable: {engine.get('error') or 'unknown error'}"
    rootless = engine.get("rootless")
    mode = "mode unknown" if rootless is None else "rootless" if rootless else "rootful"
    return f"engine   {engine.get('kind')} {engine.get('version')}, {mode} ({engine.get('host')})"


def _status_text(status: dict[str, Any]) -> str:
    daemon = status.get("daemon") or {}
    parts = [
        _engine_line(status.get("engine") or {}),
        f"daemon   {daemon.get('version', '?')}, instance {str(daemon.get('instance_id'))[:12]}",
        "",
        _tasks_text(status.get("tasks") or []),
    ]
    if isinstance(status.get("images"), dict):
        parts += ["", _images_text(status["images"], brief=True)]
    if isinstance(status.get("volumes"), dict):
        parts += ["", _volumes_text(status["volumes"])]
    task_disk = status.get("task_disk")
    if isinstance(task_disk, dict) and task_disk.get("count"):
        parts.append(
            f"task disk {human_bytes(task_disk.get('writable_bytes'))} in writable layers,"
            f" {human_bytes(task_disk.get('volume_bytes'))} in volumes,"
            f" {human_bytes(task_disk.get('slot_bytes'))} in slot dirs"
        )
    if isinstance(status.get("gc"), dict):
        parts.append(_gc_status_line(status["gc"]))
    if isinstance(status.get("gpus"), dict):
        parts += ["", _gpus_text(status["gpus"])]
    parts += [f"warning: {e}" for e in status.get("errors") or []]
    return "\n".join(parts)


def _gc_status_line(gc: dict[str, Any]) -> str:
    if gc.get("error"):
        return f"gc       failed: {gc['error']}"
    if not gc.get("last_run"):
        return f"gc       not run yet, {human_bytes(gc.get('freed_bytes_total'))} freed so far"
    return (
        f"gc       last run removed {gc.get('last_removed', 0)} object(s), "
        f"{human_bytes(gc.get('last_freed_bytes'))}; "
        f"{human_bytes(gc.get('freed_bytes_total'))} freed since the daemon started"
    )


def _gc_text(report: dict[str, Any]) -> str:
    removed = report.get("removed") or []
    verb = "would remove" if report.get("dry_run") else "removed"
    lines = [f"{verb} {len(removed)} object(s), {human_bytes(report.get('freed_bytes', 0))}"]
    lines += [
        f"  {o.get('kind')} {o.get('name')}: {o.get('reason')}"
        + (f" ({human_bytes(o['bytes'])})" if o.get("bytes") else "")
        for o in removed
    ]
    lines += [f"warning: {e}" for e in report.get("errors") or []]
    return "\n".join(lines)


def _fetch(client: DaemonClient, verb: str, args: argparse.Namespace) -> tuple[Any, str]:
    if verb == "status":
        data = client.request("GET", "/v1/status")
        return data, _status_text(data)
    if verb == "tasks":
        data = client.request("GET", "/v1/tasks")
        return data, _tasks_text(data.get("tasks") or [])
    if verb == "images":
        data = client.request("GET", "/v1/images")
        parts = [_images_text(data)]
        if isinstance(data.get("volumes"), dict):
            parts.append(_volumes_text(data["volumes"]))
        return data, "\n".join(parts)
    if verb == "gpus":
        data = client.request("GET", "/v1/gpus")
        return data, _gpus_text(data)
    if verb == "gc":
        query = "?dry_run=1" if args.dry_run else ""
        data = client.request("POST", "/v1/gc" + query, body={}, timeout=600)
        return data, _gc_text(data)
    raise ValueError(verb)


def _socket_group(path: str) -> str | None:
    try:
        return grp.getgrgid(os.stat(path).st_gid).gr_name
    except (OSError, KeyError):
        return None


def _unreachable(exc: DaemonUnreachable, path: str, as_json: bool) -> int:
    """Say what is wrong and what to do; the exit status tells the two cases apart.

    With --json, stdout still gets its one object (`{"error": {...}}`), so a script
    reading it never has to tell "no output" from "no daemon".
    """
    if exc.permission_denied:
        group = _socket_group(path)
        how = (
            f"run it as root, or as a member of the socket's group {group!r}"
            f" (sudo usermod -aG {group} $USER, then log in again)"
            if group and group != "root"
            else "run it as root, or set `socket_group` in the daemon's config so your "
            "group may use the socket"
        )
        code, status = "permission_denied", EXIT_NO_PERMISSION
        text = f"boincd-containers ctl: {exc}.\n  To use ctl, {how}."
    else:
        code, status = "not_running", EXIT_NOT_RUNNING
        text = (
            f"boincd-containers ctl: {exc}.\n"
            "  Start the daemon (the boincd-containers service, or boincd-containers serve),"
            " or point ctl at its socket with --socket or BOINCD_SOCKET."
        )
    print(text, file=sys.stderr)
    if as_json:
        _print_json({"error": {"code": code, "message": str(exc), "socket": path}})
    return status


def _print_json(data: Any) -> None:
    # One object, one line for scripts; indented for a person at a terminal.
    # dumps, not dump: dump streams through the pure-Python encoder (4x slower).
    sys.stdout.write(json.dumps(data, indent=2 if sys.stdout.isatty() else None))
    sys.stdout.write("\n")


def _exit_status(verb: str, data: Any) -> int:
    """`status` fails when the daemon says it cannot reach the engine: nothing runs then."""
    if verb == "status" and isinstance(data, dict):
        engine = data.get("engine")
        if isinstance(engine, dict) and not engine.get("reachable"):
            return EXIT_ENGINE_UNREACHABLE
    return EXIT_OK


def _query(args: argparse.Namespace) -> int:
    if args.verb == "doctor":
        from boincd_containers.cli.doctor_cli import run_doctor_command

        return run_doctor_command(args)
    path = args.socket or socket_path()
    client = DaemonClient(path)
    try:
        data, text = _fetch(client, args.verb, args)
    except DaemonUnreachable as exc:
        return _unreachable(exc, path, args.json)
    except DaemonError as exc:
        if exc.status == 404 and exc.code == "not_found" and exc.message == "Not Found":
            # aiohttp's own 404: the route is missing, not a task.
            message = f"this daemon does not offer `ctl {args.verb}` (is it older than ctl?)"
        else:
            hint = " (try again later)" if exc.retryable else ""
            message = f"{exc.message} [{exc.code}]{hint}"
        print(f"boincd-containers ctl: {message}", file=sys.stderr)
        if args.json:
            error = {"code": exc.code, "message": message, "retryable": exc.retryable}
            _print_json({"error": error})
        return EXIT_DAEMON_ERROR
    finally:
        client.close()
    if args.json:
        _print_json(data)
    else:
        print(text)
    status = _exit_status(args.verb, data)
    if status == EXIT_ENGINE_UNREACHABLE:
        print(
            "boincd-containers ctl: the daemon cannot reach the container engine: "
            "no task can start or run (see `boincd-containers ctl doctor`)",
            file=sys.stderr,
        )
    return status


def run(args: argparse.Namespace) -> int:
    try:
        status = _query(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader left (`ctl ... --json | head`): that is no error of ours. Point
        # stdout at /dev/null so the interpreter's last flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_OK
    return status
