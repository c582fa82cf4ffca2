"""The versioned JSON API on the daemon's Unix socket (documented in docs/api.md)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from . import gc, inventory, limits, memwatch, metrics
from .engine import log_tail_lines
from .errors import BadRequest, BoincdError, Forbidden
from .log import get_logger
from .peercred import Peer, peer_credentials
from .service import Daemon, Feature
from .taskspec import parse_request

log = get_logger(__name__)

DAEMON = web.AppKey("daemon", Daemon)
PEER = web.RequestKey("peer", Peer)
# memwatch after limits: it shares the record of exceeded limits.
FEATURES: tuple[Feature, ...] = (metrics, limits, memwatch, inventory, gc)
API_VERSION = 1
_READ_METHODS = {"GET", "HEAD", "OPTIONS"}


def _error_response(error: BoincdError) -> web.Response:
    return web.json_response(error.to_json(), status=error.http_status)


@web.middleware
async def errors_and_auth(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        transport = request.transport
        peer = peer_credentials(transport.get_extra_info("socket") if transport else None)
        if peer is None:
            raise Forbidden("the API is only served on a Unix socket")
        request[PEER] = peer
        if request.method not in _READ_METHODS:
            allowed = request.app[DAEMON].writer_uids
            if peer.uid not in allowed:
                raise Forbidden(
                    f"uid {peer.uid} may read but not change anything; "
                    "only root and the BOINC user may"
                )
        return await handler(request)
    except BoincdError as exc:
        return _error_response(exc)
    except web.HTTPException as exc:
        if exc.status >= 400:
            code = "not_found" if exc.status == 404 else "http_error"
            body = {"error": {"code": code, "message": exc.reason, "retryable": False}}
            return web.json_response(body, status=exc.status)
        raise
    except Exception as exc:
        log.error("request failed", path=request.path, exc_info=exc)
        return _error_response(BoincdError(f"internal error: {exc!r}"))


async def _body(request: web.Request) -> Any:
    if not request.can_read_body:
        return {}
    try:
        return await request.json()
    except json.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None


routes = web.RouteTableDef()


@routes.get("/v1/version")
async def version(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    return web.json_response(
        {"api": API_VERSION, "version": daemon.version, "instance_id": daemon.instance_id}
    )


@routes.get("/v1/status")
async def status(request: web.Request) -> web.Response:
    return web.json_response(await request.app[DAEMON].status())


@routes.get("/v1/gpus")
async def gpus(request: web.Request) -> web.Response:
    return web.json_response(await request.app[DAEMON].gpus.snapshot())


@routes.get("/v1/tasks")
async def list_tasks(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    return web.json_response(
        {"tasks": [daemon.task_json(r) for r in daemon.registry.tasks.values()]}
    )


@routes.post("/v1/tasks")
async def create_task(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    task_request = parse_request(await _body(request))
    record = await daemon.tasks.create_or_attach(task_request, request[PEER].uid)
    return web.json_response(daemon.task_json(record), status=200)


@routes.get("/v1/tasks/{result}")
async def get_task(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    record = daemon.registry.get(request.match_info["result"])
    # A shim polls its task here each second: that keeps its lease (gc.py).
    record.last_seen = time.time()
    return web.json_response(daemon.task_json(record))


def _verb(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        daemon = request.app[DAEMON]
        method = getattr(daemon.tasks, name)
        record = await method(request.match_info["result"])
        return web.json_response(daemon.task_json(record))

    return handler


routes.post("/v1/tasks/{result}/start")(_verb("start"))
routes.post("/v1/tasks/{result}/pause")(_verb("pause"))
routes.post("/v1/tasks/{result}/resume")(_verb("resume"))
routes.post("/v1/tasks/{result}/detach")(_verb("detach"))


@routes.post("/v1/tasks/{result}/network")
async def set_network(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    body = await _body(request)
    connected = body.get("connected") if isinstance(body, dict) else None
    if not isinstance(connected, bool):
        raise BadRequest('body must be {"connected": true|false}')
    record = await daemon.tasks.set_network(request.match_info["result"], connected)
    return web.json_response(daemon.task_json(record))


@routes.post("/v1/tasks/{result}/wait")
async def wait_task(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    try:
        timeout = min(float(request.query.get("timeout", "30")), 300.0)
    except ValueError:
        raise BadRequest("timeout must be a number of seconds") from None
    record = await daemon.tasks.wait(request.match_info["result"], timeout)
    return web.json_response(daemon.task_json(record))


@routes.delete("/v1/tasks/{result}")
async def remove_task(request: web.Request) -> web.Response:
    await request.app[DAEMON].tasks.remove(request.match_info["result"])
    return web.json_response({"removed": request.match_info["result"]})


# A reader that stops reading must not hold a log reader's place (and its
# buffered megabyte) for long.
_LOG_WRITE_TIMEOUT_S = 30.0


@routes.get("/v1/tasks/{result}/logs")
async def task_logs(request: web.Request) -> web.StreamResponse:
    """The end of the task's output: `tail` lines (default 200; `all` or -1: as
    many as the cap allows), at most engine.LOG_BYTES_MAX bytes, streamed."""
    daemon = request.app[DAEMON]
    record = daemon.registry.get(request.match_info["result"])
    try:
        tail = log_tail_lines(request.query.get("tail"))
    except ValueError:
        raise BadRequest("tail must be a number of lines, or 'all'") from None
    if not record.container_id:
        return web.Response(text="", content_type="text/plain")
    response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    try:
        async with contextlib.aclosing(
            daemon.engine.stream_logs(record.container_id, tail)
        ) as chunks:
            # Engine errors come before the first chunk, while a JSON error can
            # still be answered.
            async for chunk in chunks:
                async with asyncio.timeout(_LOG_WRITE_TIMEOUT_S):
                    if not response.prepared:
                        await response.prepare(request)
                    await response.write(chunk)
    except (TimeoutError, ConnectionResetError) as exc:
        if not response.prepared:
            raise
        log.info("log reader gone or not reading: connection closed", error=repr(exc))
        if request.transport is not None:
            request.transport.close()
        return response
    if not response.prepared:
        await response.prepare(request)
    await response.write_eof()
    return response


def make_app(daemon: Daemon) -> web.Application:
    app = web.Application(middlewares=[errors_and_auth], client_max_size=1 << 20)
    app[DAEMON] = daemon
    app.add_routes(routes)
    # Features own their routes, status fields and loops; see each attach().
    for feature in FEATURES:
        feature.attach(daemon, app)
    app.cleanup_ctx.append(daemon.lifecycle)
    return app
