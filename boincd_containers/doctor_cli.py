"""`ctl doctor`: platform checks, with engine facts from the daemon or, when it is
not running, from the engine socket itself."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from .doctor import EngineFacts, HostProbe, run_doctor
from .engine_hosts import identify, is_podman, pick_host
from .shim.client import DaemonClient, DaemonError, DaemonUnreachable


def _facts_from_daemon(socket: str | None) -> EngineFacts | None:
    client = DaemonClient(socket, timeout=5)
    try:
        engine: dict[str, Any] = client.request("GET", "/v1/status")["engine"]
    except (DaemonUnreachable, DaemonError, KeyError):
        return None
    finally:
        client.close()
    host = str(engine.get("host") or "")
    return EngineFacts(
        reachable=bool(engine.get("reachable")),
        kind=engine.get("kind"),
        version=engine.get("version"),
        rootless=bool(engine.get("rootless")),
        socket=host.removeprefix("unix://") or None,
        error=engine.get("error"),
    )


def _facts_from_engine() -> EngineFacts:
    host = pick_host(None)
    path = host.removeprefix("unix://")
    client = DaemonClient(path, timeout=5)
    try:
        version = client.request("GET", "/version")
        info = client.request("GET", "/info")
        libpod = None
        if is_podman(version):
            # Only Podman's own API says whether it is rootless (engine_hosts.identify).
            with contextlib.suppress(DaemonUnreachable, DaemonError):
                libpod = client.request("GET", "/v4.0.0/libpod/info")
    except (DaemonUnreachable, DaemonError) as exc:
        return EngineFacts(False, None, None, False, path, str(exc))
    finally:
        client.close()
    identity = identify(version, info, libpod)
    return EngineFacts(
        reachable=True,
        kind="podman" if identity.kind == "podman" else "docker",
        version=str(version.get("Version")),
        rootless=identity.rootless,
        socket=path,
        error=None,
        runtimes=tuple(info.get("Runtimes") or {}),
        image_store=info.get("DockerRootDir"),
    )


def run_doctor_command(args: argparse.Namespace) -> int:
    facts = _facts_from_daemon(getattr(args, "socket", None)) or _facts_from_engine()
    store = Path(facts.image_store) if facts.image_store else None
    report = run_doctor(HostProbe(image_store=store), facts)
    if args.json:
        json.dump(report.to_json(), sys.stdout)
        sys.stdout.write("\n")
    else:
        print(report.render_text())
    return report.exit_code()
