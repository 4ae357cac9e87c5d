"""The worker's settings: the common ones plus its own."""

from __future__ import annotations

import os
from typing import Self

from pydantic import Field, model_validator

from contracts.context import PROGRESS_INTERVAL
from contracts.settings import CommonSettings


class WorkerSettings(CommonSettings):
    concurrency: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=1024)
    broker_consumer_timeout: float = Field(
        default=1800.0,
        gt=0,
        description="RabbitMQ's consumer_timeout in seconds (the broker's setting, 30 min "
        "by default): a task must always end, and be acked, before it",
    )
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    lookahead: int = Field(
        default=0,
        ge=0,
        le=1000,
        description="messages a worker takes from each queue beyond its slots; a slot "
        "that frees starts the one with the earliest deadline among those it holds. They "
        "wait here for this worker's slots, not in RabbitMQ for any worker's",
    )
    metrics_host: str = "127.0.0.1"
    child_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="niceness of task processes: the worker's own loop (events, acks, "
        "kills) and anything else on the machine stay responsive while tasks burn CPU",
    )
    start_only_if_finishable: bool = Field(
        default=True,
        description="do not start a task whose time left is below the run time 99 in 100 "
        "tasks of its type (per unit of cost) stayed under here, once enough have finished "
        "to trust the estimate",
    )
    progress_interval: float = Field(
        default=PROGRESS_INTERVAL,
        ge=0,
        le=60,
        description="a task's progress reports closer together than this are merged, "
        "and its first comes no sooner after its start: each report is an event every "
        "gateway reads, and a task shorter than this reports none",
    )

    @model_validator(mode="after")
    def _below_consumer_timeout(self) -> Self:
        if self.max_timeout >= self.broker_consumer_timeout:
            raise ValueError(
                f"max_timeout ({self.max_timeout:g} s) must be below the broker's consumer "
                f"timeout ({self.broker_consumer_timeout:g} s), or RabbitMQ closes the channel "
                "of a worker running a long task and the task runs twice"
            )
        return self
