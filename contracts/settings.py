"""Settings both programs read from the environment (prefix `TIMEBOX_`)."""

from __future__ import annotations

import ipaddress
from typing import Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts.tasks import Task
from contracts.topology import Topology


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TIMEBOX_", frozen=True, extra="ignore")

    amqp_url: str = "amqp://guest:guest@localhost:5672/"
    namespace: str = Field(default="timebox", pattern=r"^[A-Za-z0-9_.-]{1,100}$")
    default_timeout: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    max_timeout: float = Field(default=600.0, gt=0, allow_inf_nan=False)
    reply_margin: float = Field(
        default=0.1, ge=0, le=10, description="stop work this long before the deadline"
    )
    kill_grace: float = Field(default=0.1, gt=0, le=30, description="SIGTERM → SIGKILL")
    clock_skew: float = Field(default=0.05, ge=0, le=60, description="tolerated clock skew")
    delivery_limit: int = Field(default=3, ge=1, le=100)
    task_queue_type: Literal["quorum", "classic"] = Field(
        default="quorum",
        description="quorum: replicated, a delivery limit (a cluster wants it); classic: a "
        "third less broker work per task on a single node (contracts/topology.py)",
    )
    task_priorities: int = Field(
        default=0,
        ge=0,
        le=10,
        description="levels of urgency of a classic task queue: a task with an earlier "
        "deadline starts before those queued with later ones (0: first in, first out; "
        "quorum queues have none on RabbitMQ 3.10)",
    )
    heartbeat: int = Field(
        default=10, ge=1, le=600, description="AMQP heartbeat: a dead link is noticed within ~2x"
    )
    reconnect_interval: float = Field(default=1.0, gt=0, le=60)
    queue_max_length: int | None = Field(default=None, ge=1)
    events_max_age: str = Field(default="1h", pattern=r"^[0-9]+[YMDhms]$")
    log_format: str = Field(default="text", pattern=r"^(text|json)$")
    estimate_min_samples: int = Field(
        default=5, ge=1, description="finished tasks of a type before its run time is trusted"
    )
    task_modules: str = Field(
        default="",
        description="comma-separated modules whose @timebox.task functions are served "
        "(the programs' MODULE arguments, when none are given)",
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.default_timeout > self.max_timeout:
            raise ValueError(
                f"default_timeout ({self.default_timeout}) is over max_timeout ({self.max_timeout})"
            )
        url = urlsplit(self.amqp_url)
        if url.scheme not in ("amqp", "amqps"):
            raise ValueError(f"amqp_url must start with amqp:// or amqps://, not {self.amqp_url!r}")
        if (url.username or "guest") == "guest" and not _is_loopback(url.hostname or ""):
            raise ValueError(
                "the 'guest' user only works on loopback: set TIMEBOX_AMQP_URL with the "
                "broker's own user for a broker on another host"
            )
        if self.task_priorities and self.task_queue_type != "classic":
            raise ValueError(
                "task_priorities needs task_queue_type=classic: quorum queues keep no "
                "priorities on RabbitMQ 3.10"
            )
        return self

    @property
    def stop_margin(self) -> float:
        """How long before its deadline a task must have stopped: the time for its answer
        to reach the client, and the clocks' disagreement."""
        return self.reply_margin + self.clock_skew

    def timeouts(self, task: Task[..., Any]) -> tuple[float, float]:
        """(default, maximum) Request-Timeout of a task type: its own, else these."""
        maximum = task.max_timeout or self.max_timeout
        return task.timeout or min(self.default_timeout, maximum), maximum

    def topology(self) -> Topology:
        return Topology(
            namespace=self.namespace,
            task_queue_type=self.task_queue_type,
            priorities=self.task_priorities,
            delivery_limit=self.delivery_limit,
            queue_max_length=self.queue_max_length,
            events_max_age=self.events_max_age,
        )
