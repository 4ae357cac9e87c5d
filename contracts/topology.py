"""Every exchange and queue of Timebox, with its arguments, in one place.

Pure data: the gateway and the workers declare what `declarations()` lists."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

ExchangeKind = Literal["direct", "fanout"]

# With priorities, a task with this little time left gets the top one: it cannot wait
URGENT = 0.5


@dataclass(frozen=True)
class ExchangeDecl:
    name: str
    kind: ExchangeKind


@dataclass(frozen=True)
class QueueDecl:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BindingDecl:
    queue: str
    exchange: str
    routing_key: str = ""


Declaration = ExchangeDecl | QueueDecl | BindingDecl


@dataclass(frozen=True)
class Topology:
    namespace: str = "timebox"
    task_queue_type: Literal["quorum", "classic"] = "quorum"
    priorities: int = 0  # levels of urgency a classic task queue keeps (0: FIFO)
    delivery_limit: int = 3
    queue_max_length: int | None = None
    events_max_age: str = "1h"
    events_max_bytes: int = 1_000_000_000

    @property
    def tasks_exchange(self) -> str:
        return f"{self.namespace}.tasks"

    @property
    def dead_exchange(self) -> str:
        return f"{self.namespace}.dead"

    @property
    def dead_queue(self) -> str:
        return f"{self.namespace}.dead"

    @property
    def parked_queue(self) -> str:
        return f"{self.namespace}.parked"

    @property
    def events_stream(self) -> str:
        return f"{self.namespace}.events"

    @property
    def control_exchange(self) -> str:
        return f"{self.namespace}.control"

    def task_queue(self, queue: str) -> str:
        """A queue of task messages: every task type routed there (by its `queue`) is
        served by each worker that consumes it."""
        return f"{self.namespace}.tasks.{queue}"

    def task_queue_arguments(self) -> dict[str, Any]:
        """A quorum queue (replicated, a delivery limit, at-least-once dead-lettering)
        or a classic one (a third less broker work per task on one node; a message that
        kills its worker comes back until its TTL, its expiry's event may be lost in a
        broker crash)."""
        args: dict[str, Any] = {
            "x-queue-type": self.task_queue_type,
            "x-dead-letter-exchange": self.dead_exchange,
            # a full queue nacks the publisher instead of dropping the oldest message
            # (and at-least-once dead-lettering needs it)
            "x-overflow": "reject-publish",
        }
        if self.task_queue_type == "quorum":
            args["x-delivery-limit"] = self.delivery_limit
            args["x-dead-letter-strategy"] = "at-least-once"
        if self.queue_max_length is not None:
            args["x-max-length"] = self.queue_max_length
        if self.priorities:
            args["x-max-priority"] = self.priorities - 1
        return args

    def priority(self, left: float) -> int:
        """The urgency of a task published with `left` seconds to its deadline: the
        queue hands out the highest first, so the earliest deadlines start first
        (bands of a factor √2 from URGENT up; 0 for all without priorities)."""
        top = self.priorities - 1
        if top <= 0 or left <= URGENT:
            return max(top, 0)
        return max(0, top - 1 - math.floor(2 * math.log2(left / URGENT)))

    def declarations(self, routes: Mapping[str, str]) -> list[Declaration]:
        """Everything, with a task queue for each queue of `routes` (task type: queue)
        bound to the tasks exchange by the types routed there."""
        decls: list[Declaration] = [
            ExchangeDecl(self.tasks_exchange, "direct"),
            ExchangeDecl(self.dead_exchange, "fanout"),
            ExchangeDecl(self.control_exchange, "fanout"),
            QueueDecl(self.dead_queue, {"x-queue-type": "quorum"}),
            BindingDecl(self.dead_queue, self.dead_exchange),
            QueueDecl(self.parked_queue, {"x-queue-type": "quorum"}),
            QueueDecl(
                self.events_stream,
                {
                    "x-queue-type": "stream",
                    "x-max-age": self.events_max_age,
                    "x-max-length-bytes": self.events_max_bytes,
                },
            ),
        ]
        for queue in sorted(set(routes.values())):
            decls.append(QueueDecl(self.task_queue(queue), self.task_queue_arguments()))
        for task, queue in routes.items():
            decls.append(BindingDecl(self.task_queue(queue), self.tasks_exchange, task))
        return decls

    def owned_names(self, routes: Mapping[str, str]) -> tuple[list[str], list[str]]:
        """(exchanges, queues) this namespace owns: what a teardown deletes."""
        decls = self.declarations(routes)
        return (
            [d.name for d in decls if isinstance(d, ExchangeDecl)],
            [d.name for d in decls if isinstance(d, QueueDecl)],
        )
