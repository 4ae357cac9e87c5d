"""Declares the topology on a channel its caller hands it: the one place where the
order of declarations lives (the gateway and the workers both declare everything, so
either may start first)."""

from __future__ import annotations

from collections.abc import Mapping

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from contracts.topology import BindingDecl, ExchangeDecl, QueueDecl, Topology


async def counts(channel: AbstractChannel, queue: str) -> tuple[int, int]:
    """The broker's current (ready messages, consumers) of `queue`, by a passive declare
    on the raw channel: aio-pika's robust channel answers a passive declare of a queue it
    knows from a cache, with stale counts."""
    raw = await channel.get_underlay_channel()
    result = await raw.queue_declare(queue, passive=True)
    return result.message_count or 0, result.consumer_count or 0


async def declare(channel: AbstractChannel, topology: Topology, routes: Mapping[str, str]) -> None:
    """Declares everything, with the task queues of `routes` (task type: queue)."""
    queues: dict[str, AbstractQueue] = {}
    exchanges: dict[str, AbstractExchange] = {}
    for decl in topology.declarations(routes):
        if isinstance(decl, ExchangeDecl):
            exchanges[decl.name] = await channel.declare_exchange(
                decl.name, aio_pika.ExchangeType(decl.kind), durable=True
            )
        elif isinstance(decl, QueueDecl):
            queues[decl.name] = await channel.declare_queue(
                decl.name, durable=True, arguments=decl.arguments
            )
        elif isinstance(decl, BindingDecl):
            await queues[decl.queue].bind(exchanges[decl.exchange], decl.routing_key)
