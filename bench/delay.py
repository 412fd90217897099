"""A TCP relay that delays every byte by a fixed one-way latency: a stand-in for ``tc netem``.

This machine's kernel has no netem (``CONFIG_NET_SCH_NETEM`` is not set), so the 20 ms round
trip is added in user space: each chunk read on one side is written to the other ``delay`` later,
in order, with no throughput limit (chunks in flight overlap, as packets on a wire do). The TCP
handshake's round trip is emulated by opening the upstream connection 1.5 round trips after
accepting, so that the server's banner reaches the client two round trips after ``connect()``,
as on a network.

Usage: ``python -m bench.delay DELAY_MS LISTEN_PORT:TARGET_PORT ...`` (127.0.0.1 both sides);
prints ``ready`` once every port listens, runs until SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

HOST = "127.0.0.1"


async def _forward(
    reader: asyncio.StreamReader,
    writer_ready: asyncio.Future[asyncio.StreamWriter],
    delay: float,
) -> None:
    """Copy ``reader`` to the writer once it exists, each chunk ``delay`` after it arrived."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def pump_in() -> None:
        try:
            while data := await reader.read(65536):
                queue.put_nowait((loop.time() + delay, data))
        except (ConnectionError, OSError):
            pass
        queue.put_nowait((loop.time() + delay, b""))

    async def pump_out() -> None:
        writer = await writer_ready
        try:
            while True:
                due, data = await queue.get()
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            return

    await asyncio.gather(pump_in(), pump_out())


async def _relay(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    target_port: int,
    delay: float,
) -> None:
    loop = asyncio.get_running_loop()
    upstream: asyncio.Future[asyncio.StreamWriter] = loop.create_future()
    client_side: asyncio.Future[asyncio.StreamWriter] = loop.create_future()
    client_side.set_result(client_writer)
    to_server = asyncio.ensure_future(_forward(client_reader, upstream, delay))
    try:
        await asyncio.sleep(3 * delay)  # SYN, SYN-ACK, ACK: the handshake a network would cost
        server_reader, server_writer = await asyncio.open_connection(HOST, target_port)
        upstream.set_result(server_writer)
        await asyncio.gather(to_server, _forward(server_reader, client_side, delay))
    except (ConnectionError, OSError):
        to_server.cancel()
    finally:
        for writer in (client_writer, upstream.result() if upstream.done() else None):
            if writer is not None:
                writer.close()
                with contextlib.suppress(ConnectionError, OSError):
                    await writer.wait_closed()


async def serve(delay_ms: float, mapping: list[tuple[int, int]]) -> None:
    """Listen on every port of ``mapping`` and relay to its target with ``delay_ms`` each way."""
    delay = delay_ms / 1000
    servers = []
    for listen_port, target_port in mapping:

        async def handle(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: int = target_port
        ) -> None:
            await _relay(reader, writer, target, delay)

        servers.append(await asyncio.start_server(handle, HOST, listen_port, backlog=1024))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    mapping = [(int(a), int(b)) for a, _, b in (item.partition(":") for item in argv[2:])]
    asyncio.run(serve(float(argv[1]), mapping))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
