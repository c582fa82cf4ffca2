"""`ctl doctor`: platform checks, with engine facts from the daemon or, when it is
not running, from the engine socket itself."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import urllib.parse
from pathlib import Path
from typing import Any

from . import labels as L
from .doctor import EngineFacts, HostProbe, run_doctor
from .engine_hosts import identify, is_podman, pick_host
from .hostprobe import LabelledContainer
from .settings import Settings, SettingsError, load_settings
from .shim.client import DaemonClient, DaemonError, DaemonUnreachable


def _facts_from_daemon(socket: str | None) -> EngineFacts | None:
    client = DaemonClient(socket, timeout=5)
    try:
        status: dict[str, Any] = client.request("GET", "/v1/status")
        engine: dict[str, Any] = status["engine"]
        instance = (status.get("daemon") or {}).get("instance_id")
    except (DaemonUnreachable, DaemonError, KeyError, AttributeError, TypeError):
        return None
    finally:
        client.close()
    host = str(engine.get("host") or "")
    return EngineFacts(
        instance_id=str(instance) if instance else None,
        reachable=bool(engine.get("reachable")),
        kind=engine.get("kind"),
        version=engine.get("version"),
        rootless=bool(engine.get("rootless")),
        socket=host.removeprefix("unix://") or None,
        error=engine.get("error"),
    )


def _facts_from_engine(docker_host: str | None) -> EngineFacts:
    host = pick_host(docker_host)
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


def _labelled(socket: str | None) -> tuple[LabelledContainer, ...] | None:
    """Every container with our owner label, whichever instance; None if the engine is mute."""
    if not socket:
        return None
    query = urllib.parse.urlencode({"all": "1", "filters": json.dumps({"label": [L.OWNER]})})
    client = DaemonClient(socket, timeout=10)
    try:
        listed = client.request("GET", f"/containers/json?{query}")
    except (DaemonUnreachable, DaemonError):
        return None
    finally:
        client.close()
    found = []
    for item in listed if isinstance(listed, list) else []:
        labels = item.get("Labels") or {}
        names = item.get("Names") or []
        if L.OWNER in labels and names:
            found.append(
                LabelledContainer(
                    name=str(names[0]).lstrip("/"),
                    owner=str(labels[L.OWNER]),
                    state=str(item.get("State") or "unknown"),
                    project=labels.get(L.PROJECT),
                    result=labels.get(L.RESULT),
                )
            )
    return tuple(found)


def _instance_id(state_dir: str) -> str | None:
    """Read only: the daemon creates the id on its first start, doctor never does."""
    try:
        return (Path(state_dir) / "instance_id").read_text().strip() or None
    except OSError:
        return None


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        print(f"boincd-containers ctl doctor: {exc}; ignoring the config file", file=sys.stderr)
    try:
        return load_settings({"config": os.devnull})  # the environment still counts
    except SettingsError:
        return Settings()


def run_doctor_command(args: argparse.Namespace) -> int:
    settings = _settings()
    facts = _facts_from_daemon(getattr(args, "socket", None)) or _facts_from_engine(
        settings.docker_host
    )
    if facts.reachable:
        facts = dataclasses.replace(
            facts,
            instance_id=facts.instance_id or _instance_id(settings.state_dir),
            labelled=_labelled(facts.socket),
        )
    store = Path(facts.image_store) if facts.image_store else None
    probe = HostProbe(image_store=store, boinc_user=settings.boinc_user)
    report = run_doctor(probe, facts)
    if args.json:
        json.dump(report.to_json(), sys.stdout)
        sys.stdout.write("\n")
    else:
        print(report.render_text())
    return report.exit_code()
