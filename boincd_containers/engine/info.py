"""What the daemon knows of the engine it talks to, learnt at connect."""

from __future__ import annotations

from dataclasses import dataclass

from boincd_containers.engine import compat as engine_compat


@dataclass(frozen=True, slots=True)
class EngineInfo:
    kind: str  # "docker" or "podman"
    version: str
    api_version: str
    rootless: bool
    cgroup_version: str
    cgroup_driver: str
    host: str
    data_root: str
    # Controllers ("cpu", "memory", "pids") whose limits the engine really applies.
    limits: frozenset[str] = engine_compat.ALL_LIMITS
    # False: no freezer cgroup (rootless on cgroup v1); we pause with SIGSTOP instead.
    freezer: bool = True
    # Rootless Podman's user namespace: host ids → ids inside its containers.
    uid_map: engine_compat.IdMap = ()
    gid_map: engine_compat.IdMap = ()
    # When the engine process started (0.0: unknown). Docker without live-restore
    # stops every container when it shuts down: one that exited before this was
    # interrupted, not finished (see TaskRecord.interrupted_by_reboot).
    started_at: float = 0.0
    # When this daemon first had an answer from that engine process: Docker
    # answers only once it has restored its containers, and without live-restore
    # that means stopping those an engine that died (SIGKILL, crash) left running.
    answered_at: float = 0.0

    @property
    def description(self) -> str:
        """ "rootless Podman 4.3.1": how messages name the engine."""
        name = {"docker": "Docker", "podman": "Podman"}.get(self.kind, self.kind)
        return f"{'rootless ' if self.rootless else ''}{name} {self.version}".strip()
