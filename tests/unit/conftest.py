"""Unit tests run on a fake engine: no real bind mounts (host/mounts.py), which would
outlive the fake containers. The checked paths are given to the fake as they
are, the daemon's mode without mount(2); tests/unit/test_safepath.py turns
mounting on where it tests it."""

from __future__ import annotations

import pytest

from boincd_containers.host import mounts


@pytest.fixture(autouse=True)
def _no_bind_mounts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mounts, "can_bind", lambda: False)
