"""`boincd-containers ctl`: what the daemon is doing, for volunteers (standard library only)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from .shim.client import DaemonClient, DaemonError, DaemonUnreachable


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _tasks_text(tasks: list[dict[str, Any]]) -> str:
    if not tasks:
        return "no tasks"
    rows = [
        (
            t.get("project"),
            t.get("result"),
            t.get("state"),
            f"{t.get('cpu_time_s', 0.0):.1f}s",
            human_bytes(t.get("memory_bytes")),
            ",".join(g[:12] for g in t.get("gpus") or []) or "-",
            (t.get("container_id") or "")[:12] or t.get("progress") or "-",
        )
        for t in tasks
    ]
    return table(("PROJECT", "RESULT", "STATE", "CPU", "MEMORY", "GPU", "CONTAINER"), rows)


def _images_text(images: dict[str, Any]) -> str:
    head = (
        f"images: {images.get('count', 0)}, {human_bytes(images.get('total_bytes'))} on disk"
        f" ({human_bytes(images.get('reclaimable_bytes'))} reclaimable)"
    )
    rows = [
        (
            i.get("ref"),
            (i.get("id") or "").removeprefix("sha256:")[:12],
            human_bytes(i.get("size_bytes")),
            human_bytes(i.get("unique_bytes")),
            human_bytes(i.get("shared_bytes")),
            ",".join(i.get("projects") or []) or "-",
            "yes" if i.get("pinned") else "",
        )
        for i in images.get("items") or []
    ]
    parts = [head]
    if rows:
        parts.append(table(("IMAGE", "ID", "SIZE", "UNIQUE", "SHARED", "PROJECTS", "PINNED"), rows))
    projects = images.get("projects") or {}
    if projects:
        parts.append(
            table(
                ("PROJECT", "USES", "ONLY ITS OWN"),
                [
                    (p, human_bytes(v.get("bytes")), human_bytes(v.get("unique_bytes")))
                    for p, v in sorted(projects.items())
                ],
            )
        )
    return "\n".join(parts)


def _gpus_text(gpus: dict[str, Any]) -> str:
    if gpus.get("error"):
        return f"GPUs: {gpus['error']}"
    devices = gpus.get("devices") or []
    if not devices:
        return "GPUs: none"
    rows = [
        (
            d.get("index"),
            d.get("name"),
            (d.get("uuid") or "")[:16],
            human_bytes(d.get("memory_total")),
            human_bytes(d.get("memory_used")),
            f"{sum(s.get('usage', 0.0) for s in d.get('shares') or []):g}",
        )
        for d in devices
    ]
    return table(("#", "NAME", "UUID", "MEMORY", "USED", "SHARED"), rows)


def _status_text(status: dict[str, Any]) -> str:
    engine = status.get("engine") or {}
    if engine.get("reachable"):
        mode = " rootless" if engine.get("rootless") else ""
        engine_line = (
            f"engine: {engine.get('kind')} {engine.get('version')}{mode} ({engine.get('host')})"
        )
    else:
        engine_line = f"engine: unavailable ({engine.get('error')})"
    parts = [engine_line, "", _tasks_text(status.get("tasks") or [])]
    if "images" in status:
        parts += ["", _images_text(status["images"])]
    volumes = status.get("volumes")
    if volumes is not None:
        parts.append(
            f"volumes: {volumes.get('count', 0)}, {human_bytes(volumes.get('total_bytes'))}"
        )
    if "gpus" in status:
        parts += ["", _gpus_text(status["gpus"])]
    return "\n".join(parts)


def _gc_text(report: dict[str, Any]) -> str:
    removed = report.get("removed") or []
    verb = "would remove" if report.get("dry_run") else "removed"
    lines = [f"{verb} {len(removed)} object(s), {human_bytes(report.get('freed_bytes', 0))}"]
    lines += [f"  {o.get('kind')} {o.get('name')}: {o.get('reason')}" for o in removed]
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
        return data, _images_text(data)
    if verb == "gpus":
        data = client.request("GET", "/v1/gpus")
        return data, _gpus_text(data)
    if verb == "gc":
        query = "?dry_run=1" if args.dry_run else ""
        data = client.request("POST", "/v1/gc" + query, body={}, timeout=600)
        return data, _gc_text(data)
    raise ValueError(verb)


def run(args: argparse.Namespace) -> int:
    if args.verb == "doctor":
        from .doctor_cli import run_doctor_command

        return run_doctor_command(args)
    client = DaemonClient(args.socket)
    try:
        data, text = _fetch(client, args.verb, args)
    except DaemonUnreachable as exc:
        print(f"boincd-containers ctl: {exc}", file=sys.stderr)
        return 3
    except DaemonError as exc:
        print(f"boincd-containers ctl: {exc.message} ({exc.code})", file=sys.stderr)
        return 1
    finally:
        client.close()
    if args.json:
        json.dump(data, sys.stdout, indent=None if not sys.stdout.isatty() else 2)
        sys.stdout.write("\n")
    else:
        print(text)
    return 0
