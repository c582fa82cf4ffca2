"""Daemon settings: command-line flag > environment > TOML config file > default.

The result is frozen: every part of the daemon reads the same values for its
whole life, and a changed config takes effect on restart, like any service.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from boincd_containers.core.errors import BadRequest

DEFAULT_SOCKET = "/run/boincd-containers/boincd.sock"
DEFAULT_STATE_DIR = "/var/lib/boincd-containers"
DEFAULT_CONFIG = "/etc/boincd-containers/config.toml"


class SettingsError(BadRequest):
    code = "bad_settings"


@dataclass(frozen=True, slots=True)
class Settings:
    socket: str = DEFAULT_SOCKET
    state_dir: str = DEFAULT_STATE_DIR
    config: str = DEFAULT_CONFIG
    # None: DOCKER_HOST, then the usual Docker and Podman sockets.
    docker_host: str | None = None
    # Group that owns the socket (mode 0660), so the BOINC user can reach it.
    socket_group: str | None = None
    # Besides root, the one user allowed to change anything over the socket.
    boinc_user: str = "boinc"
    log_level: str = "info"
    log_json: bool | None = None
    relist_interval_s: float = 30.0
    sample_interval_s: float = 1.0
    gc_interval_s: float = 300.0
    gc_grace_s: float = 3600.0
    # How long a task's shim may stay silent before GC may treat the client as gone.
    shim_lease_s: float = 14 * 24 * 3600.0
    pids_limit: int = 4096
    # The memory limit of a task BOINC gave no `rsc_memory_bound`. None: half the
    # host's RAM, BOINC's own default share for computing while the computer is in
    # use (global_prefs `ram_max_used_busy_pct` = 50).
    default_memory_bytes: int | None = None
    # The size of the tmpfs /tmp and /var/tmp of a task with a read-only root (at
    # most its memory limit, in which tmpfs pages count).
    tmp_size_bytes: int = 1024 * 1024 * 1024
    # None: a share of the free disk under the engine's data root, decided at start.
    image_cache_budget_bytes: int | None = None
    tag_refresh_interval_s: float = 3600.0
    # A pull that brings no data for this long is given up and tried again later
    # (with backoff: 5 s, doubling up to 5 min), as one whose registry is down.
    pull_stall_s: float = 120.0
    network_name: str = "bridge"
    engine_timeout_s: float = 60.0
    # GPU inventory: "auto" (NVML for NVIDIA, /sys for AMD and Intel), "none" (give
    # containers no GPU), or "fake:N" (N pretend NVIDIA cards, for tests on GPU-less hosts).
    gpu_backend: str = "auto"
    # The longest one GPU driver call (NVML, sysfs) may take before the daemon
    # stops waiting for it: a hung driver must not hang `ctl status` or a task.
    gpu_timeout_s: float = 10.0

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


_ENV_NAMES = {
    "socket": "BOINCD_SOCKET",
    "state_dir": "BOINCD_STATE_DIR",
    "config": "BOINCD_CONFIG",
    "docker_host": "DOCKER_HOST",
}


def _env_name(field_name: str) -> str:
    return _ENV_NAMES.get(field_name, "BOINCD_" + field_name.upper())


def _coerce(name: str, kind: Any, value: Any, source: str) -> Any:
    """Turn a config or environment value into the field's type, or say clearly why not."""
    text_source = isinstance(value, str)
    try:
        if kind in ("bool", "bool | None"):
            if isinstance(value, bool):
                return value
            if text_source and value.lower() in ("1", "true", "yes", "on"):
                return True
            if text_source and value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind in ("int", "int | None"):
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if not isinstance(value, str):
            raise ValueError(value)
        return value
    except (TypeError, ValueError):
        raise SettingsError(
            f"setting {name!r} from {source}: {value!r} is not a valid {kind}"
        ) from None


def load_settings(
    flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Merge the four sources; unknown config keys are an error, not silently ignored."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    environ = os.environ if environ is None else environ
    kinds = {f.name: f.type for f in fields(Settings)}

    config_path = flags.get("config") or environ.get(_env_name("config")) or DEFAULT_CONFIG
    from_file: dict[str, Any] = {}
    path = Path(config_path)
    if path.exists():
        try:
            from_file = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise SettingsError(f"cannot read config file {path}: {exc}") from None
        unknown = sorted(set(from_file) - set(kinds) - {"config"})
        if unknown:
            raise SettingsError(
                f"config file {path}: unknown setting(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(kinds))}"
            )
    elif "config" in flags or _env_name("config") in environ:
        raise SettingsError(f"config file {path} does not exist")

    values: dict[str, Any] = {"config": str(path)}
    for name, kind in kinds.items():
        if name == "config":
            continue
        if name in flags:
            values[name] = _coerce(name, kind, flags[name], "the command line")
        elif _env_name(name) in environ:
            values[name] = _coerce(name, kind, environ[_env_name(name)], _env_name(name))
        elif name in from_file:
            values[name] = _coerce(name, kind, from_file[name], str(path))
    return Settings(**values)
