"""Every exchange and queue of Timebox, with its arguments, in one place.

Pure data: the gateway and the workers declare what `declarations()` lists."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

ExchangeKind = Literal["direct", "fanout"]


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

# replicated like the task queues: a classic queue would be unreachable, and every
# client's reconnect would fail, while its home node is down
WORKERS_QUEUE_ARGUMENTS: dict[str, Any] = {"x-queue-type": "quorum"}


@dataclass(frozen=True)
class Topology:
    namespace: str = "timebox"
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

    @property
    def work_exchange(self) -> str:
        """Work notices (a task message was just queued), routed by task type to the
        workers that pull that type: a worker binds its control queue once per type it
        pulls, and not the type whose queue it is consuming."""
        return f"{self.namespace}.work"

    @property
    def gateways_exchange(self) -> str:
        """Watch notices between gateways: one gateway serves the event stream of a task
        that another streams to a client that went away (it reconnected here)."""
        return f"{self.namespace}.gateways"

    def task_queue(self, task: str) -> str:
        return f"{self.namespace}.tasks.{task}"

    def workers_queue(self, task: str) -> str:
        """Never holds a message: its consumers are the workers serving `task`, for
        the gateways (and the management UI) to count — workers that pull their tasks
        do not show as consumers of the task queue."""
        return f"{self.namespace}.workers.{task}"

    def task_queue_arguments(self) -> dict[str, Any]:
        args: dict[str, Any] = {
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": self.dead_exchange,
            "x-delivery-limit": self.delivery_limit,
            # at-least-once dead-lettering needs reject-publish; it also makes a full
            # queue nack the publisher instead of dropping the oldest message.
            "x-overflow": "reject-publish",
            "x-dead-letter-strategy": "at-least-once",
        }
        if self.queue_max_length is not None:
            args["x-max-length"] = self.queue_max_length
        return args

    def declarations(self, tasks: Iterable[str]) -> list[Declaration]:
        decls: list[Declaration] = [
            ExchangeDecl(self.tasks_exchange, "direct"),
            ExchangeDecl(self.dead_exchange, "fanout"),
            ExchangeDecl(self.control_exchange, "fanout"),
            ExchangeDecl(self.work_exchange, "direct"),
            ExchangeDecl(self.gateways_exchange, "fanout"),
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
        for task in tasks:
            queue = self.task_queue(task)
            decls.append(QueueDecl(queue, self.task_queue_arguments()))
            decls.append(BindingDecl(queue, self.tasks_exchange, task))
            decls.append(QueueDecl(self.workers_queue(task), WORKERS_QUEUE_ARGUMENTS))
        return decls

    def owned_names(self, tasks: Iterable[str]) -> tuple[list[str], list[str]]:
        """(exchanges, queues) this namespace owns: what a teardown deletes."""
        decls = self.declarations(tasks)
        return (
            [d.name for d in decls if isinstance(d, ExchangeDecl)],
            [d.name for d in decls if isinstance(d, QueueDecl)],
        )
