"""Many images that share base layers, made from local files in one `docker load`.

No registry on the internet is reachable, and 200 `docker build`s would take
minutes, so the suite writes a `docker save` archive itself: `manifest.json`,
one config per image and one tar per distinct layer. Every image has a base
layer (busybox with all its applets, one of a few bases, so projects share
layers the way real images share a distro) and a small layer of its own, with
an ENV step in between that makes no layer (as Dockerfiles do), so that the
accounting has to tell layer-making history entries from empty ones.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

BUSYBOX = Path("/bin/busybox")  # Debian busybox-static: no shared libraries needed
_MTIME = 1_700_000_000
_CREATED = "2024-01-01T00:00:00Z"


def _applets() -> list[str]:
    done = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True)
    return [a for a in done.stdout.split() if a and a != "busybox"]


def _tar(files: dict[str, bytes], dirs: dict[str, int], links: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, mode in sorted(dirs.items()):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, _MTIME
            tar.addfile(info)
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o755, _MTIME
            tar.addfile(info, io.BytesIO(data))
        for name, target in sorted(links.items()):
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.mtime = tarfile.SYMTYPE, target, _MTIME
            tar.addfile(info)
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ImageSet:
    archive: Path
    refs: tuple[str, ...]
    bases: int
    archive_bytes: int


def write_image_set(path: Path, repo: str, count: int, bases: int, marker: str) -> ImageSet:
    """`count` images `<repo>/img<i>:latest` over `bases` shared base layers."""
    busybox = BUSYBOX.read_bytes()
    links = {f"bin/{a}": "busybox" for a in _applets()}
    dirs = {
        "bin": 0o755,
        "etc": 0o755,
        "tmp": 0o1777,
        "app": 0o755,
        "proc": 0o755,
        "sys": 0o755,
        "dev": 0o755,
    }
    base_layers = [
        _tar({"bin/busybox": busybox, "etc/base": f"{marker} base {b}\n".encode()}, dirs, links)
        for b in range(bases)
    ]
    manifest = []
    refs = []
    with tarfile.open(path, "w") as out:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, _MTIME
            out.addfile(info, io.BytesIO(data))

        for b, layer in enumerate(base_layers):
            add(f"base{b}/layer.tar", layer)
        for i in range(count):
            # Sizes differ per image (4 KiB .. 64 KiB of incompressible bytes), so a
            # mix-up between images shows in the totals.
            own = os.urandom(4096 * (1 + i % 16))
            layer = _tar({f"etc/variant-{i}": own}, {"etc": 0o755}, {})
            add(f"img{i}/layer.tar", layer)
            base = i % bases
            config = {
                "architecture": "amd64",
                "os": "linux",
                "created": _CREATED,
                "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin", f"BENCH_IMAGE={i}"]},
                "rootfs": {"type": "layers", "diff_ids": [_sha(base_layers[base]), _sha(layer)]},
                "history": [
                    {
                        "created": _CREATED,
                        "created_by": f"/bin/sh -c #(nop) ADD file:base{base} in / ",
                    },
                    {
                        "created": _CREATED,
                        "created_by": f"/bin/sh -c #(nop)  ENV BENCH_IMAGE={i}",
                        "empty_layer": True,
                    },
                    {
                        "created": _CREATED,
                        "created_by": f"/bin/sh -c #(nop) COPY file:v{i} in /etc/ ",
                    },
                ],
            }
            raw = json.dumps(config, sort_keys=True).encode()
            config_name = hashlib.sha256(raw).hexdigest() + ".json"
            add(config_name, raw)
            ref = f"{repo}/img{i}:latest"
            refs.append(ref)
            manifest.append(
                {
                    "Config": config_name,
                    "RepoTags": [ref],
                    "Layers": [f"base{base}/layer.tar", f"img{i}/layer.tar"],
                }
            )
        add("manifest.json", json.dumps(manifest).encode())
    return ImageSet(path, tuple(refs), bases, path.stat().st_size)
