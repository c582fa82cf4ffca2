"""The versioned JSON API on the daemon's Unix socket (documented in docs/api.md)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from boincd_containers.core.errors import BadRequest, BoincdError, Conflict, Forbidden
from boincd_containers.core.log import get_logger
from boincd_containers.daemon import metrics
from boincd_containers.daemon.keys import COLLECTOR, DAEMON, INVENTORY
from boincd_containers.daemon.peercred import Peer, peer_credentials
from boincd_containers.engine.streams import log_tail_lines
from boincd_containers.job.spec import check_name, parse_request

if TYPE_CHECKING:
    pass

log = get_logger(__name__)

PEER = web.RequestKey("peer", Peer)
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


# Dry runs change nothing: anyone allowed on the socket may ask for them.
_DRY_RUN_PATHS = frozenset({"/v1/gc", "/v1/images/evict"})


def _reads_only(request: web.Request) -> bool:
    if request.method in _READ_METHODS:
        return True
    return request.method == "POST" and request.path in _DRY_RUN_PATHS and _dry_run(request)


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
    text = await request.app[DAEMON].status_text()
    return web.Response(text=text, content_type="application/json")


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


def _task_of(request: web.Request) -> tuple[str, str | None]:
    """The task a URL names: its result, and `?project=` where given.

    Results are unique per project, not per host: with the project the URL names
    that project's task; without it, the one task of that result name (a 409 when
    two projects have one; the shim always names its project)."""
    return request.match_info["result"], request.query.get("project")


@routes.get("/v1/tasks/{result}")
async def get_task(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    record = daemon.registry.get(*_task_of(request))
    # A shim polls its task here each second: that keeps its lease (gc/collector.py).
    # Only the task's own side renews it, so a reader polling cannot keep an
    # abandoned task's container alive.
    if _renews_lease(request[PEER].uid, daemon.writer_uids, record.slot_dir):
        daemon.registry.store.touch(record)
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
        result, project = _task_of(request)
        record = await method(result, project)
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
    result, project = _task_of(request)
    record = await daemon.tasks.set_network(result, connected, project)
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
    result, project = _task_of(request)
    record = await daemon.tasks.wait(result, timeout, project)
    return web.json_response(daemon.task_json(record))


@routes.delete("/v1/tasks/{result}")
async def remove_task(request: web.Request) -> web.Response:
    result, project = _task_of(request)
    await request.app[DAEMON].tasks.remove(result, project)
    return web.json_response({"removed": result})


# A reader that stops reading must not hold a log reader's place (and its
# buffered megabyte) for long.
_LOG_WRITE_TIMEOUT_S = 30.0


@routes.get("/v1/tasks/{result}/logs")
async def task_logs(request: web.Request) -> web.StreamResponse:
    """The end of the task's output: `tail` lines (default 200; `all` or -1: as
    many as the cap allows), at most engine.streams.LOG_BYTES_MAX bytes, streamed."""
    daemon = request.app[DAEMON]
    record = daemon.registry.get(*_task_of(request))
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


def _dry_run(request: web.Request) -> bool:
    return request.query.get("dry_run", "0").lower() in ("1", "true", "yes")


@routes.get("/v1/images")
async def list_images(request: web.Request) -> web.Response:
    fields = await request.app[INVENTORY].status_fields()
    extra = {k: fields[k] for k in ("volumes", "containers")}
    return web.json_response({**fields["images"], **extra})


@routes.post("/v1/images/evict")
async def evict_images(request: web.Request) -> web.Response:
    budget = request.query.get("budget_bytes")
    if budget is not None and not budget.isdigit():
        raise BadRequest("budget_bytes must be a whole number of bytes")
    report = await request.app[INVENTORY].evict(
        dry_run=_dry_run(request), budget_bytes=None if budget is None else int(budget)
    )
    return web.json_response(report.to_json())


@routes.post("/v1/gc")
async def collect_garbage(request: web.Request) -> web.Response:
    report = await request.app[COLLECTOR].collect(dry_run=_dry_run(request))
    return web.json_response(report.to_json())


@routes.get("/metrics")
async def prometheus_metrics(request: web.Request) -> web.Response:
    """Prometheus text. Reading it is a GET: anyone who may open the socket may
    scrape it, like `GET /v1/status`."""
    text = metrics.render(await metrics.collect(request.app[DAEMON]))
    return web.Response(body=text.encode(), headers={"Content-Type": metrics.CONTENT_TYPE})
