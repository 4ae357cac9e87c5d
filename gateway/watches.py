"""Watch notices between gateways.

A client streaming a task (a POST with `Accept: text/event-stream`), or waiting for
it with an Idempotency-Key, that loses its connection has `stream_grace` seconds to
come back before its gateway cancels the task as abandoned. Behind a load balancer it
may come back to another gateway (to the task's events, or with the same key): that
one says so on `{ns}.gateways` (each gateway has its own queue bound there), and the
first one leaves the task alone, as it would for a client back on itself."""

from __future__ import annotations

import logging
import time

from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from contracts.background import Background
from contracts.messages import WatchNotice
from gateway.broker import Broker
from gateway.tasktable import Record, TaskTable

log = logging.getLogger("timebox.gateway.watches")


class Watches:
    def __init__(self, broker: Broker, table: TaskTable, grace: float) -> None:
        self.broker = broker
        self.table = table
        self.grace = grace
        self._sending = Background()

    async def start(self) -> None:
        assert self.broker.connection is not None
        channel = await self.broker.connection.channel()
        exchange = await channel.get_exchange(self.broker.topology.gateways_exchange)
        # a name of our own, so that a reconnect re-declares the same queue
        queue = await channel.declare_queue(
            f"{exchange.name}.{self.broker.name}", exclusive=True, auto_delete=True
        )
        await queue.bind(exchange)
        await queue.consume(self._on_message, no_ack=True)

    async def close(self) -> None:
        await self._sending.cancel()

    def tell(self, record: Record) -> None:
        """This gateway starts serving `record`'s task to a client (its events, or an
        idempotent retry): if it has not ended, the others hear of it (at most once
        per half grace per task)."""
        now = time.monotonic()
        if record.status.state.terminal or now - record.told_watched < self.grace / 2:
            return
        record.told_watched = now
        self._sending.spawn(self.broker.send_watch_notice(record.status.id))

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if message.app_id == self.broker.name:
            return  # its own: its subscribers are counted where they are
        try:
            notice = WatchNotice.model_validate_json(message.body)
        except ValidationError as exc:
            log.warning("ignored a malformed watch notice: %s", exc)
            return
        record = self.table.get(notice.task_id)
        if record is not None:
            record.watched_elsewhere = time.monotonic()
