"""The floor of a status answer: a bare aiohttp app in its own process that
answers every GET with the same JSON bytes, over a Unix socket, as the daemon
does. `python -m benchmarks.static_server SOCKET FILE` serves FILE until killed.

Whatever the daemon's answer costs beyond this one is the daemon's own work;
this much is the HTTP server, the socket and the client reading the bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from aiohttp import web


def main() -> None:
    socket_path, body_file = sys.argv[1], sys.argv[2]
    body = Path(body_file).read_bytes()

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    web.run_app(app, path=socket_path, access_log=None, print=None)


if __name__ == "__main__":
    main()
