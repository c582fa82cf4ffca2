"""Images: inspect, list, tag and remove; pull, load and build, their progress
streams followed line by line."""

from __future__ import annotations

import builtins
import contextlib
import json
from collections.abc import AsyncIterable, Awaitable, Callable
from pathlib import Path
from typing import BinaryIO

import aiohttp

from boincd_containers.core.errors import BadRequest, ImageError, NotFound
from boincd_containers.engine.session import (
    DISK_FULL,
    JSON,
    JSONList,
    Session,
    disk_full,
    label_filters,
)

ProgressCallback = Callable[[JSON], Awaitable[None] | None]

_PROGRESS_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600)


class Images:
    def __init__(self, session: Session) -> None:
        self._session = session

    async def inspect(self, ref: str) -> JSON:
        result: JSON = await self._session.call(f"inspect image {ref}", f"images/{ref}/json")
        return result

    async def history(self, ref: str) -> JSONList:
        result: JSONList = await self._session.call(f"image history {ref}", f"images/{ref}/history")
        return result

    async def list(self, labels: dict[str, str] | None = None) -> JSONList:
        params = label_filters(labels) if labels else None
        result: JSONList = await self._session.call("list images", "images/json", params=params)
        return result

    async def tag(self, ref: str, new_ref: str) -> None:
        repo, _, tag = new_ref.rpartition(":")
        await self._session.call(
            f"tag image {ref} as {new_ref}",
            f"images/{ref}/tag",
            "POST",
            params={"repo": repo, "tag": tag},
        )

    async def remove(self, ref: str) -> JSONList:
        """Remove (or untag, when `ref` is one name of several); an already gone
        image is fine."""
        try:
            result: JSONList = await self._session.call(
                f"remove image {ref}", f"images/{ref}", "DELETE"
            )
        except NotFound:
            return []
        return result or []

    async def pull(self, ref: str, progress: ProgressCallback | None = None) -> None:
        """Pull and follow the progress stream; the stream's own error lines become ImageError."""
        last = ref.rsplit("/", 1)[-1]
        # `repo@sha256:...` goes whole in fromImage; an empty tag would pull every tag.
        image, _, tag = ref.rpartition(":") if ":" in last and "@" not in last else (ref, "", "")
        params = {"fromImage": image, "tag": tag} if tag else {"fromImage": ref}
        await self._progress(f"pull {ref}", "images/create", params=params, progress=progress)

    async def load(
        self,
        tarball: Path | BinaryIO,
        progress: ProgressCallback | None = None,
        *,
        name: str | None = None,
    ) -> builtins.list[str]:
        """`docker load` of a tarball (a path, or a file opened by the caller, read
        from where it stands); returns the image ids/refs the engine reports."""
        loaded: builtins.list[str] = []
        name = name or (tarball.name if isinstance(tarball, Path) else "archive")

        async def collect(line: JSON) -> None:
            stream = str(line.get("stream", ""))
            for prefix in ("Loaded image ID: ", "Loaded image: "):
                if stream.startswith(prefix):
                    loaded.append(stream[len(prefix) :].strip())
            if progress is not None:
                maybe = progress(line)
                if maybe is not None:
                    await maybe

        # The open file, not its bytes: aiohttp streams it (reading in a worker
        # thread), so a multi-GB archive never sits in the daemon's memory.
        with contextlib.ExitStack() as stack:
            fh = stack.enter_context(tarball.open("rb")) if isinstance(tarball, Path) else tarball
            await self._progress(
                f"load {name}",
                "images/load",
                params={"quiet": "1"},
                body=fh,
                headers={"Content-Type": "application/x-tar"},
                progress=collect,
            )
        return loaded

    async def build(
        self,
        context_tar: bytes | AsyncIterable[bytes],
        tag: str,
        labels: dict[str, str],
        buildargs: dict[str, str],
        progress: ProgressCallback | None = None,
        *,
        network: bool = True,
    ) -> None:
        """`docker build`; the context as bytes or, for any real one, an async
        iterable of pieces, sent as they come (chunked): never whole in memory.
        Without `network`, its steps run with none (BOINC suspended network use)."""
        params = {
            "t": tag,
            "labels": json.dumps(labels),
            "buildargs": json.dumps(buildargs),
            "rm": "1",
            "forcerm": "1",
        }
        if not network:
            params["networkmode"] = "none"
        await self._progress(
            f"build {tag}",
            "build",
            params=params,
            body=context_tar,
            headers={"Content-Type": "application/x-tar"},
            progress=progress,
        )

    async def _progress(
        self,
        what: str,
        path: str,
        *,
        params: dict[str, str],
        body: bytes | BinaryIO | AsyncIterable[bytes] | None = None,
        headers: dict[str, str] | None = None,
        progress: ProgressCallback | None = None,
    ) -> None:
        """POST and follow the JSON lines of the answer to its end."""
        try:
            async with self._session.query(
                what,
                path,
                "POST",
                params=params,
                data=body,
                headers=headers,
                timeout=_PROGRESS_TIMEOUT,
            ) as response:
                async for raw_line in response.content:
                    if not raw_line.strip():
                        continue
                    try:
                        line = json.loads(raw_line)
                    except json.JSONDecodeError:
                        continue
                    if line.get("error") or line.get("errorDetail"):
                        detail = line.get("errorDetail") or {}
                        message = f"{what}: {detail.get('message') or line.get('error')}"
                        if DISK_FULL in message.lower():
                            raise disk_full(message)
                        raise ImageError(message)
                    if progress is not None:
                        maybe = progress(line)
                        if maybe is not None:
                            await maybe
        except (NotFound, BadRequest) as exc:
            # No such image or repository, a bad reference: the image's fault.
            raise ImageError(exc.message) from exc
