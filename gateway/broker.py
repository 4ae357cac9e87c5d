"""The gateway's side of RabbitMQ: one robust connection, confirmed publishes."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable
from datetime import UTC, datetime

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)
from aiormq.exceptions import DeliveryError, PublishError

from contracts.deadline import Deadline
from contracts.errors import BrokerUnavailable, ConfirmLost, Overloaded
from contracts.events import TaskEvent
from contracts.messages import (
    CLIENT_GRACE_HEADER,
    CLIENT_UNTIL_HEADER,
    CONTENT_TYPE,
    COST_HEADER,
    OWNER_HEADER,
    PRESENCE_TYPE,
    PUBLISHED_HEADER,
    SYNC_TYPE,
    CancelRequest,
    Presence,
)
from contracts.topology import Topology
from gateway.settings import GatewaySettings
from runtime import tracing
from runtime.amqp import (
    PERSISTENT,
    connect,
    parked_copy,
    publish,
    publish_event,
    until_confirmed,
)
from runtime.declare import declare

log = logging.getLogger("timebox.gateway.broker")


def _not_connected() -> BrokerUnavailable:
    return BrokerUnavailable("not connected to RabbitMQ; retry shortly", retry_after=2)


class Broker:
    def __init__(self, settings: GatewaySettings, routes: dict[str, str]) -> None:
        self.settings = settings
        self.routes = routes  # task type: queue
        self.topology: Topology = settings.topology()
        self.instance = uuid.uuid4().hex
        self.connection: AbstractRobustConnection | None = None
        self.channel: AbstractChannel | None = None
        self._control_exchange: AbstractExchange | None = None

    @property
    def name(self) -> str:
        """Its connection's name in the management UI."""
        return f"gateway {self.instance[:8]}"

    async def start(self) -> None:
        self.connection = await connect(
            self.settings.amqp_url,
            self.name,
            heartbeat=self.settings.heartbeat,
            reconnect_interval=self.settings.reconnect_interval,
            log=log,
        )
        self.channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        await declare(self.channel, self.topology, self.routes)
        self._control_exchange = await self.channel.get_exchange(self.topology.control_exchange)

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()

    @property
    def connected(self) -> bool:
        return (
            self.connection is not None
            and not self.connection.is_closed
            and self.channel is not None
            and not self.channel.is_closed
        )

    def require_connected(self) -> None:
        """Raises the 503 of a gateway that cannot publish now."""
        if not self.connected:
            raise _not_connected()

    def _live_channel(self) -> AbstractChannel:
        """The publishing channel, or 503 at once while the connection is down."""
        self.require_connected()
        assert self.channel is not None
        return self.channel

    async def _publish(
        self, exchange: AbstractExchange | None, message: aio_pika.Message, routing_key: str
    ) -> None:
        if exchange is None or not self.connected:
            raise _not_connected()
        await self._confirmed(
            exchange.publish(message, routing_key, timeout=self.settings.publish_timeout),
            routing_key,
        )

    async def _confirmed(self, publishing: Awaitable[object], routing_key: str) -> None:
        """Awaits a publish, its failures told as the HTTP errors they mean."""
        try:
            await publishing
        except PublishError as exc:
            raise BrokerUnavailable(f"the broker could not route the message: {exc}") from exc
        except DeliveryError as exc:
            raise Overloaded(
                f"queue {routing_key!r} is full (the broker refused the message)", retry_after=1
            ) from exc
        except (TimeoutError, ConnectionError, RuntimeError) as exc:
            raise ConfirmLost(f"no confirm from RabbitMQ: {exc!r}", retry_after=2) from exc
        except aio_pika.exceptions.AMQPError as exc:
            raise ConfirmLost(f"RabbitMQ error: {exc!r}", retry_after=2) from exc

    async def publish_event(self, event: TaskEvent) -> None:
        channel = self._live_channel()
        stream, within = self.topology.events_stream, self.settings.publish_timeout
        await self._confirmed(publish_event(channel, stream, event, confirm_within=within), stream)

    async def publish_sync_marker(self) -> None:
        """A marker in the event stream: reading it back means the table has caught up."""
        assert self.channel is not None
        await self._publish(
            self.channel.default_exchange,
            aio_pika.Message(self.instance.encode(), type=SYNC_TYPE),
            self.topology.events_stream,
        )

    async def publish_task(
        self,
        task: str,
        task_id: str,
        body: bytes,
        deadline: Deadline,
        owner: str | None,
        cost: float | None = None,
        client_grace: float | None = None,
        priority: int = 0,
    ) -> None:
        """Publishes a task; one tied to its client carries its presence, a second
        deadline: a grace from now, renewed by each word of the client."""
        headers: dict[str, aio_pika.abc.FieldValue] = dict(deadline.headers())
        headers[PUBLISHED_HEADER] = round(time.time() * 1_000_000)
        tracing.inject(headers)  # `traceparent`: the worker's spans continue the trace
        if owner is not None:
            headers[OWNER_HEADER] = owner
        if cost is not None:
            headers[COST_HEADER] = cost
        if client_grace is not None:
            headers[CLIENT_UNTIL_HEADER] = round((time.time() + client_grace) * 1000)
            headers[CLIENT_GRACE_HEADER] = client_grace
        channel = self._live_channel()
        properties = aiormq.spec.Basic.Properties(
            content_type=CONTENT_TYPE,
            delivery_mode=PERSISTENT,
            headers=headers,
            message_id=task_id,
            message_type=task,
            expiration=str(deadline.ttl_ms()),
            timestamp=datetime.now(UTC),
            priority=priority or None,
        )
        await self._confirmed(
            publish(
                channel,
                body,
                properties,
                exchange=self.topology.tasks_exchange,
                routing_key=task,
                mandatory=True,  # no queue for the task type: refused, not dropped
                confirm_within=self.settings.publish_timeout,
            ),
            task,
        )

    async def publish_presence(self, presence: Presence) -> None:
        """Tells every worker which tied tasks have a client here (gateway/presence.py)."""
        await self._publish(
            self._control_exchange,
            aio_pika.Message(
                presence.model_dump_json().encode(),
                content_type=CONTENT_TYPE,
                type=PRESENCE_TYPE,
                delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
            ),
            "",
        )

    async def publish_cancel(self, request: CancelRequest) -> None:
        await self._publish(
            self._control_exchange,
            aio_pika.Message(request.model_dump_json().encode(), content_type=CONTENT_TYPE),
            "",
        )

    async def send_cancel(self, request: CancelRequest, what: str | None = None) -> bool:
        """Publishes a cancel, retried until confirmed or until the task's deadline (then
        its message expires unstarted, and the cancel no longer matters). False if it
        gave up."""
        return await until_confirmed(
            lambda: self.publish_cancel(request),
            what or f"the cancel of task {request.task_id}",
            log,
            give_up_at=request.deadline_ms / 1000 or None,  # 0: its deadline is unknown
        )

    async def announce(self, event: TaskEvent, *, give_up_at: float | None = None) -> None:
        """Publishes an event nobody else will publish (how a task ended), retried until
        confirmed, or until `give_up_at` (epoch seconds)."""
        await until_confirmed(
            lambda: self.publish_event(event),
            f"the {event.type.value} event of task {event.task_id}",
            log,
            give_up_at=give_up_at,
        )

    async def publish_parked(self, message: AbstractIncomingMessage, reason: str) -> None:
        """Copies a message to `{ns}.parked`, with why, for a person to inspect."""
        assert self.channel is not None
        await self._publish(
            self.channel.default_exchange,
            parked_copy(message, reason),
            self.topology.parked_queue,
        )
