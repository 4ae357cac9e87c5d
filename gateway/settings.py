"""The gateway's settings: the common ones plus its own."""

from __future__ import annotations

from pydantic import Field

from contracts.settings import CommonSettings


class GatewaySettings(CommonSettings):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    task_table_size: int = Field(default=100_000, ge=100, description="tasks kept in memory")
    sse_heartbeat: float = Field(default=15.0, gt=0, description="seconds between SSE comments")
    sse_send_timeout: float = Field(default=10.0, gt=0, description="cut a stuck SSE client")
    subscriber_buffer: int = Field(default=1000, ge=10, description="events queued per SSE client")
    stream_grace: float = Field(
        default=5.0,
        ge=0,
        description="seconds a streaming client may take to reconnect before its task is cancelled",
    )
    publish_timeout: float = Field(default=5.0, gt=0, description="wait for a broker confirm")
    admission: bool = Field(default=True, description="refuse what cannot finish in time")
    management_url: str = Field(
        default="auto",
        description="RabbitMQ management API for unacked counts: a URL, 'auto' (the AMQP "
        "host, port 15672) or 'off'",
    )
