"""The HTTP listener's connections have TCP_NODELAY, as asyncio gives the sockets it
creates itself. Without it Nagle's algorithm held each small response write (an SSE
chunk, a short JSON body) until the client's delayed ACK: +40 ms on every request."""

from __future__ import annotations

import asyncio
import socket

from mlx_kvshard.server.run import listen
from mlx_kvshard.settings import ServerSettings


def test_accepted_connections_have_tcp_nodelay():
    sock = listen(ServerSettings(host="127.0.0.1", port=0))
    port = sock.getsockname()[1]
    seen = []

    async def main():
        async def on_connect(reader, writer):
            s = writer.get_extra_info("socket")
            seen.append(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=sock)  # as uvicorn serves the socket
        async with server:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(100):
                if seen:
                    break
                await asyncio.sleep(0.01)
            w.close()

    asyncio.run(main())
    assert seen and seen[0] != 0
