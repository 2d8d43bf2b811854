"""`python -m bench._echo`: a local HTTP echo for tool benchmarks; prints its port.

POST /echo answers the JSON body it was sent, and the Idempotency-Key it carried.
"""

from __future__ import annotations

import asyncio

from aiohttp import web


async def _echo(request: web.Request) -> web.Response:
    body = await request.json()
    return web.json_response({"echo": body, "key": request.headers.get("Idempotency-Key", "")})


async def _main() -> None:
    app = web.Application()
    app.router.add_post("/echo", _echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    print(site._server.sockets[0].getsockname()[1], flush=True)  # type: ignore[union-attr]
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_main())
