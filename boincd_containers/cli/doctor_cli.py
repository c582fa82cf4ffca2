"""`ctl doctor`: the daemon first (does it answer, which engine does it see, may this
user change things), then what this user can reach itself, then the host."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import os
import socket
import sys
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from boincd_containers.cli.doctor import DaemonFacts, EngineFacts, HostProbe, run_doctor
from boincd_containers.cli.doctor_advice import same_host
from boincd_containers.cli.hostprobe import LabelledContainer, SeenBy
from boincd_containers.core import labels as L
from boincd_containers.core.settings import Settings, SettingsError, load_settings
from boincd_containers.engine.hosts import identify, is_podman, pick_host
from boincd_containers.shim.client import DaemonClient, DaemonError, DaemonUnreachable

# A path no route has: the daemon's auth middleware answers 403 to a reader before
# routing says 404, so a POST there learns whether this user may change things, and
# changes nothing.
_WRITE_PROBE = "/v1/doctor/may-change"


def ask_daemon(socket: str) -> tuple[DaemonFacts, EngineFacts | None]:
    """What boincd-containers says on its socket: itself, and the engine it sees."""
    client = DaemonClient(socket, timeout=5)
    try:
        status: Any = client.request("GET", "/v1/status")
        engine: Any = status.get("engine") if isinstance(status, dict) else None
        if not isinstance(engine, dict):
            raise DaemonError(200, "bad_answer", "GET /v1/status has no engine", False)
        may_change, refusal = _may_change(client)
    except DaemonUnreachable as exc:
        return DaemonFacts(socket, False, str(exc), exc.permission_denied), None
    except DaemonError as exc:
        return DaemonFacts(socket, False, f"the daemon answered {exc.status}: {exc}"), None
    finally:
        client.close()
    about = status.get("daemon") if isinstance(status.get("daemon"), dict) else {}
    instance = about.get("instance_id")
    host = str(engine.get("host") or "")
    facts = EngineFacts(
        instance_id=str(instance) if instance else None,
        reachable=bool(engine.get("reachable")),
        kind=engine.get("kind") if engine.get("kind") in ("docker", "podman") else None,
        version=engine.get("version"),
        rootless=bool(engine.get("rootless")),
        socket=host.removeprefix("unix://") or None,
        error=engine.get("error"),
    )
    daemon = DaemonFacts(
        socket,
        True,
        version=about.get("version"),
        instance_id=facts.instance_id,
        may_change=may_change,
        access_detail=refusal,
    )
    return daemon, facts


def _may_change(client: DaemonClient) -> tuple[bool | None, str | None]:
    try:
        client.request("POST", _WRITE_PROBE, body={})
    except DaemonError as exc:
        if exc.status == 403:
            return False, exc.message
        if exc.status in (404, 405):
            return True, None
        return None, None
    except DaemonUnreachable:
        return None, None
    return None, None  # a route there after all: no conclusion


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class EngineProbe:
    """GETs on an engine as doctor's user: a Unix socket or tcp:// (DOCKER_HOST)."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url
        if url.startswith("unix://") or url.startswith("/"):
            self.conn: http.client.HTTPConnection = _UnixConnection(
                url.removeprefix("unix://"), timeout
            )
        elif url.startswith(("tcp://", "http://")):
            where = urllib.parse.urlsplit("http://" + url.split("://", 1)[1])
            self.conn = http.client.HTTPConnection(
                where.hostname or "localhost", where.port or 2375, timeout=timeout
            )
        else:
            raise ValueError(f"doctor cannot probe {url} itself (only unix:// and tcp://)")

    def get(self, path: str) -> Any:
        self.conn.request("GET", path, headers={"Host": "localhost"})
        answer = self.conn.getresponse()
        body = answer.read()
        if answer.status >= 400:
            raise http.client.HTTPException(f"GET {path}: HTTP {answer.status}")
        return json.loads(body)

    def close(self) -> None:
        self.conn.close()


def probe_engine(url: str, source: str | None = None, seen_by: SeenBy = "user") -> EngineFacts:
    """The engine at ``url`` as this user reaches it, or why not."""
    path = url.removeprefix("unix://")
    try:
        client = EngineProbe(url)
    except ValueError as exc:
        return EngineFacts(
            False, None, None, False, path, str(exc), seen_by=seen_by, host_source=source
        )
    try:
        version = client.get("/version")
        info = client.get("/info")
        libpod = None
        if is_podman(version):
            # Only Podman's own API says whether it is rootless (engine_hosts.identify).
            with contextlib.suppress(OSError, http.client.HTTPException, ValueError):
                libpod = client.get("/v4.0.0/libpod/info")
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return EngineFacts(
            False, None, None, False, path, _why(exc), seen_by=seen_by, host_source=source
        )
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
        seen_by=seen_by,
        host_source=source,
    )


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"[Errno {exc.errno}] {exc.strerror}"
    return str(exc) or type(exc).__name__


def _labelled(url: str | None) -> tuple[LabelledContainer, ...] | None:
    """Every container with our owner label, whichever instance; None if the engine is mute."""
    if not url:
        return None
    query = urllib.parse.urlencode({"all": "1", "filters": json.dumps({"label": [L.OWNER]})})
    try:
        client = EngineProbe(url, timeout=10)
    except ValueError:
        return None
    try:
        listed = client.get(f"/containers/json?{query}")
    except (OSError, http.client.HTTPException, ValueError):
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


def _settings(environ: Mapping[str, str]) -> tuple[Settings, str | None]:
    """Settings as the daemon would read them, and the config file's own docker_host."""
    try:
        settings = load_settings(environ=environ)
    except SettingsError as exc:
        print(f"boincd-containers ctl doctor: {exc}; ignoring the config file", file=sys.stderr)
        try:
            settings = load_settings({"config": os.devnull}, environ)  # environment still counts
        except SettingsError:
            settings = Settings()
    without = {k: v for k, v in environ.items() if k != "DOCKER_HOST"}
    try:
        from_file = load_settings({"config": settings.config}, without).docker_host
    except SettingsError:
        from_file = None
    return settings, from_file


def _source(
    url: str | None, environ: Mapping[str, str], config: str, from_file: str | None
) -> str | None:
    if url and same_host(url, environ.get("DOCKER_HOST")):
        return "DOCKER_HOST"
    if url and same_host(url, from_file):
        return f"docker_host in {config}"
    return None


def gather_facts(
    socket: str, environ: Mapping[str, str] | None = None
) -> tuple[DaemonFacts, EngineFacts, EngineFacts | None]:
    """The daemon's word first; the engine as this user reaches it second."""
    env = os.environ if environ is None else environ
    settings, from_file = _settings(env)
    daemon, engine = ask_daemon(socket)
    mine: EngineFacts | None = None
    if engine is not None and engine.socket:
        host = engine.socket if "://" in engine.socket else "unix://" + engine.socket
        source = _source(host, env, settings.config, from_file)
        engine = dataclasses.replace(engine, host_source=source)
        mine = probe_engine(host, source)
    if engine is None:
        # No daemon to ask: the engine it would use, as far as this user can tell.
        host = pick_host(settings.docker_host, env)
        engine = probe_engine(host, _source(host, env, settings.config, from_file))
    reach = mine if mine is not None and mine.reachable else engine
    if reach.reachable:
        listing = (
            reach.socket if reach.socket and "://" in reach.socket else f"unix://{reach.socket}"
        )
        engine = dataclasses.replace(
            engine,
            instance_id=engine.instance_id or _instance_id(settings.state_dir),
            labelled=_labelled(listing),
        )
    return daemon, engine, mine


def run_doctor_command(args: argparse.Namespace) -> int:
    settings, _ = _settings(os.environ)
    socket = getattr(args, "socket", None) or settings.socket
    daemon, engine, mine = gather_facts(socket)
    store = Path(engine.image_store) if engine.image_store else None
    probe = HostProbe(image_store=store, boinc_user=settings.boinc_user)
    report = run_doctor(probe, engine, daemon, mine)
    if args.json:
        json.dump(report.to_json(), sys.stdout)
        sys.stdout.write("\n")
    else:
        print(report.render_text())
    return report.exit_code()
