"""The test image's root filesystem (boincd_containers/testing/daemon.py): a fresh machine
builds it from /bin/busybox alone, so its layout must be right by itself."""

from __future__ import annotations

import io
import tarfile

import pytest

from boincd_containers.testing.daemon import BUSYBOX, busybox_rootfs

pytestmark = pytest.mark.skipif(not BUSYBOX.exists(), reason="needs busybox-static")


def test_busybox_is_the_binary_and_every_applet_links_to_it() -> None:
    with tarfile.open(fileobj=io.BytesIO(busybox_rootfs())) as tar:
        members = {m.name: m for m in tar.getmembers()}
    binary = members["bin/busybox"]
    # `busybox --list` names busybox itself: linked too, it would point at itself.
    assert binary.isfile()
    assert binary.size == BUSYBOX.stat().st_size
    assert binary.mode & 0o111
    links = {name for name, m in members.items() if m.issym()}
    assert "bin/sh" in links
    assert all(members[name].linkname == "busybox" for name in links)
    assert members["tmp"].isdir()
