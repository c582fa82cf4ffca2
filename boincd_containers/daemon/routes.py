"""The versioned JSON API on the daemon's Unix socket (documented in docs/api.md)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from boincd_containers.core.errors import BadRequest, BoincdError, Conflict, Forbidden, NotFound
from boincd_containers.core.log import get_logger
from boincd_containers.daemon import metrics
from boincd_containers.daemon.peercred import Peer, peer_credentials
from boincd_containers.daemon.service import Daemon, Feature
from boincd_containers.engine.streams import log_tail_lines
from boincd_containers.gc import collector as gc
from boincd_containers.gc import inventory
from boincd_containers.job.spec import check_name, parse_request
from boincd_containers.watch import limits, memwatch

log = get_logger(__name__)

DAEMON = web.AppKey("daemon", Daemon)
PEER = web.RequestKey("peer", Peer)
# memwatch after limits: it shares the record of exceeded limits.
FEATURES: tuple[Feature, ...] = (metrics, limits, memwatch, inventory, gc)
API_VERSION = 1
_READ_METHODS = {"GET", "HEAD", "OPTIONS"}
# A task request is a few KiB; nothing the API takes comes near this.
MAX_BODY_BYTES = 1 << 20
# The deepest body the API takes is 3 levels (a task's mounts); 32 leaves room.
MAX_JSON_DEPTH = 32
# Numbers in bodies are counts, bytes and seconds: 2**63 and its 19 digits suffice.
MAX_JSON_INT_DIGITS = 20
MAX_JSON_INT = 2**63 - 1
# Query values are numbers and flags: short ASCII.
MAX_QUERY_VALUE = 64
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


def _error_response(error: BoincdError) -> web.Response:
    return web.json_response(error.to_json(), status=error.http_status)


def http_error_body(status: int, message: str) -> dict[str, object]:
    """The JSON error for a status aiohttp decided (no route, too large, bad HTTP)."""
    code = _HTTP_CODES.get(status, "bad_request" if status == 400 else "http_error")
    if status >= 500:
        code = "internal"
    return {"error": {"code": code, "message": message, "retryable": False}}


def _check_query(request: web.Request) -> None:
    # Every query value the API knows is a number or a flag; anything else
    # (non-ASCII digits, 5,000-digit numbers) is refused before a handler's
    # int()/float() sees it.
    for key, value in request.query.items():
        if key == "project":
            check_name(value, "project")
            continue
        if len(value) > MAX_QUERY_VALUE or not (value.isascii() and value.isprintable()):
            raise BadRequest(f"query parameter {ascii(key)[:40]} is not a short ASCII value")


def _check_project(daemon: Daemon, result: str, project: str | None) -> None:
    """`?project=` on a task URL: the task of that result must be that project's.

    Results are unique per project, not per host, and the daemon keeps one task
    per result name: a shim naming its project never gets another project's
    task (a 404 for it, as for a task that is not there)."""
    record = daemon.registry.tasks.get(result)
    if project is not None and record is not None and record.project != project:
        raise NotFound(f"no task for result {result!r} of project {project!r}")


# Dry runs change nothing: anyone allowed on the socket may ask for them.
_DRY_RUN_PATHS = frozenset({"/v1/gc", "/v1/images/evict"})


def _reads_only(request: web.Request) -> bool:
    if request.method in _READ_METHODS:
        return True
    dry_run = request.query.get("dry_run", "0").lower() in ("1", "true", "yes")
    return request.method == "POST" and request.path in _DRY_RUN_PATHS and dry_run


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
        _check_query(request)
        result = request.match_info.get("result")
        if result is not None:
            check_name(result, "result")
            _check_project(request.app[DAEMON], result, request.query.get("project"))
        if not _reads_only(request):
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
            message = exc.reason
            if exc.status == 413:
                message = f"the request body is larger than {MAX_BODY_BYTES} bytes"
            response = web.json_response(http_error_body(exc.status, message), status=exc.status)
            if "Allow" in exc.headers:  # a 405 says which methods the path takes
                response.headers["Allow"] = exc.headers["Allow"]
            return response
        raise
    except web.RequestPayloadError as exc:
        # A body the content coding could not decode (bad gzip/deflate).
        message = f"the request body could not be read: {exc}"
        return web.json_response(http_error_body(400, message[:500]), status=400)
    except HttpProcessingError as exc:
        # A body the HTTP layer could not read (bad chunking, bad compression,
        # cut short): the client's fault, like the parser's own errors.
        status = exc.code if 400 <= exc.code < 500 else 400
        message = f"the request body could not be read: {exc.message}"
        return web.json_response(http_error_body(status, message), status=status)
    except Exception as exc:
        # A bug: logged with its traceback here, never sent to the client.
        log.error("request failed", method=request.method, path=request.path, exc_info=exc)
        error = BoincdError(f"internal error ({type(exc).__name__}); see the daemon's log")
        return _error_response(error)


def _reject_constant(name: str) -> Any:
    raise BadRequest(f"{name} is not a number the API takes")


def _parse_int(text: str) -> int:
    # Before int(): Python refuses over 4,300 digits with a ValueError of its own.
    value = int(text) if len(text) <= MAX_JSON_INT_DIGITS else None
    if value is None or abs(value) > MAX_JSON_INT:
        raise BadRequest(f"number {text[:24]} is too large")
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or abs(value) > MAX_JSON_INT:
        raise BadRequest(f"number {text[:24]} is too large")
    return value


def _depth(value: Any) -> int:
    """Nesting depth of decoded JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth > MAX_JSON_DEPTH:
                break
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def decode_json(raw: bytes, charset: str | None) -> Any:
    """A request body → JSON value, or a BadRequest saying what is wrong with it.

    JSON is UTF-8 (RFC 8259); a body labelled otherwise, or not valid UTF-8, is
    refused rather than guessed at.
    """
    if charset is not None and charset.strip().lower() not in ("utf-8", "utf8"):
        raise BadRequest(f"the body must be UTF-8 JSON, not charset {ascii(charset)[:40]}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"the body is not valid UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(
            text,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_reject_constant,
        )
    except json.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest(f"the body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise BadRequest(f"the body is nested deeper than {MAX_JSON_DEPTH} levels")
    return value


async def _body(request: web.Request) -> Any:
    if not request.can_read_body:
        return {}
    # read() enforces client_max_size (a JSON 413 via the middleware).
    return decode_json(await request.read(), request.charset)


routes = web.RouteTableDef()


@routes.get("/v1/version")
async def version(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    return web.json_response(
        {"api": API_VERSION, "version": daemon.version, "instance_id": daemon.instance_id}
    )


@routes.get("/v1/status")
async def status(request: web.Request) -> web.Response:
    data = await request.app[DAEMON].status()
    keeper = request.app.get(inventory.INVENTORY)  # keeps the images' JSON between answers
    if keeper is None:
        return web.json_response(data)
    return web.Response(text=keeper.encode_status(data), content_type="application/json")


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
    # Only the task's own side renews it, so a reader polling cannot keep an
    # abandoned task's container alive.
    if _renews_lease(request[PEER].uid, daemon.writer_uids, record.slot_dir):
        record.last_seen = time.time()
    return web.json_response(daemon.task_json(record))


def _renews_lease(uid: int, writers: frozenset[int], slot_dir: str) -> bool:
    """Root, or a writer uid that owns the task's slot dir (the shim runs as its owner)."""
    if uid == 0:
        return True
    if uid not in writers or not slot_dir:
        return False
    try:
        return os.lstat(slot_dir).st_uid == uid
    except OSError:
        return False


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
        timeout = float(request.query.get("timeout", "30"))
    except ValueError:
        raise BadRequest("timeout must be a number of seconds") from None
    if not 0 <= timeout < math.inf:  # NaN too
        raise BadRequest("timeout must be a number of seconds, 0 or more")
    timeout = min(timeout, 300.0)
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
        raise Conflict(f"task {record.result!r} has no container yet, so no logs")
    response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    try:
        async with contextlib.aclosing(
            daemon.engine.containers.stream_logs(record.container_id, tail)
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
    app = web.Application(middlewares=[errors_and_auth], client_max_size=MAX_BODY_BYTES)
    app[DAEMON] = daemon
    app.add_routes(routes)
    # Features own their routes, status fields and loops; see each attach().
    for feature in FEATURES:
        feature.attach(daemon, app)
    app.cleanup_ctx.append(daemon.lifecycle)
    return app
