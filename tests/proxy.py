"""A TCP proxy on loopback between a program and the broker, which a test can cut
(bytes are swallowed both ways: a silent partition, as on a real network) and heal,
drop connections from, or have refuse new ones. Given several targets it connects to
the first that answers, like a load balancer in front of a cluster."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from tests.harness import Gateway, free_port

if TYPE_CHECKING:
    from tests.conftest import Stack


class Proxy:
    def __init__(
        self,
        target_port: int,
        target_host: str = "127.0.0.1",
        *more: int,
        listen_port: int | None = None,  # a port programs already try: the broker "starts"
    ) -> None:
        self.targets = [(target_host, p) for p in (target_port, *more)]
        self.port = listen_port or free_port()
        self.cut_off = False
        self.refusing = False  # new connections are closed at once
        self._writers: set[asyncio.StreamWriter] = set()
        self._accepted: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._accept, "127.0.0.1", self.port)
        )
        self._ready.set()
        self._loop.run_forever()
        server.close()
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.run_until_complete(server.wait_closed())
        self._loop.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.close()
            return
        for target in self.targets:
            try:
                up_reader, up_writer = await asyncio.open_connection(*target)
                break
            except OSError:
                continue
        else:
            writer.close()
            return
        self._writers.update({writer, up_writer})
        self._accepted.append((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if self.cut_off:
                    continue  # swallowed: neither side hears the other
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()

    @property
    def accepted(self) -> int:
        """How many connections it has accepted, in all."""
        return len(self._accepted)

    def cut(self) -> None:
        self.cut_off = True

    def heal(self) -> None:
        self.cut_off = False

    def drop(self, index: int | None = None) -> None:
        """Closes every connection through it at once, or only the index-th it accepted:
        the program sees its connection reset and connects again (through the proxy)."""

        def close() -> None:
            writers = list(self._writers) if index is None else self._accepted[index]
            for w in writers:
                w.close()

        self._loop.call_soon_threadsafe(close)

    def close(self) -> None:
        def stop() -> None:
            for w in list(self._writers):
                w.close()
            self._loop.stop()

        self._loop.call_soon_threadsafe(stop)
        self._thread.join(5)


@contextlib.contextmanager
def gateway_through_proxy(stack: Stack, amqp_url: str) -> Iterator[tuple[Gateway, Proxy]]:
    """A gateway whose broker connections go through a proxy the test controls."""
    url = urlsplit(amqp_url)
    proxy = Proxy(url.port or 5672, url.hostname or "127.0.0.1")
    try:
        yield stack.gateway(TIMEBOX_AMQP_URL=url_to_port(amqp_url, proxy.port)), proxy
    finally:
        proxy.close()


def url_to_port(amqp_url: str, port: int) -> str:
    """The same broker URL, credentials and all, to another port on loopback."""
    url = urlsplit(amqp_url)
    return url._replace(netloc=f"{url.username}:{url.password}@127.0.0.1:{port}").geturl()
