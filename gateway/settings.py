"""The gateway's settings: the common ones plus its own."""

from __future__ import annotations

from pydantic import Field

from contracts.settings import CommonSettings


class GatewaySettings(CommonSettings):
    host: str = "127.0.0.1"
    access_log: bool = Field(default=False, description="uvicorn's line per HTTP request")
    port: int = Field(default=8000, ge=0, le=65535)
    task_table_size: int = Field(default=100_000, ge=100, description="tasks kept in memory")
    sse_heartbeat: float = Field(default=15.0, gt=0, description="seconds between SSE comments")
    sse_send_timeout: float = Field(default=10.0, gt=0, description="cut a stuck SSE client")
    console_period: float = Field(default=1.0, gt=0, description="seconds between /console updates")
    subscriber_buffer: int = Field(default=1000, ge=10, description="events queued per SSE client")
    stream_grace: float = Field(
        default=5.0,
        ge=0,
        description="seconds a streaming client may take to reconnect before its task is cancelled",
    )
    publish_timeout: float = Field(default=5.0, gt=0, description="wait for a broker confirm")
    arrival_wait: float = Field(
        default=1.0,
        ge=0,
        le=10,
        description="seconds to wait for an unknown task id to arrive in the event stream "
        "(a task submitted through another gateway a moment ago) before answering 404",
    )
    history_wait: float = Field(
        default=30.0,
        ge=0,
        le=300,
        description="seconds an event stream of an unknown task id waits for a starting "
        "gateway to read the event stream, rather than answering 503 (which stops a "
        "browser's EventSource for good)",
    )
    admission: bool = Field(default=True, description="refuse what cannot finish in time")
    max_queue_wait: float | None = Field(
        default=None,
        gt=0,
        description="refuse a task that would wait longer than this many seconds for a "
        "slot, whatever its deadline: under overload a longer queue adds latency, not "
        "throughput, and keeps out requests with short deadlines",
    )
    api_keys: str = Field(
        default="",
        description="comma-separated API keys; empty leaves the API open (local use)",
        repr=False,
    )
    token_secret: str = Field(
        default="",
        description="signs the events URLs given to browsers; empty derives it from the API "
        "keys, so replicas with the same keys accept each other's URLs",
        repr=False,
    )
    events_token_ttl: float = Field(
        default=600.0, gt=0, description="life of an events URL after its deadline"
    )
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024, description="larger → 413")
    management_url: str = Field(
        default="auto",
        description="RabbitMQ management API for unacked counts: a URL, 'auto' (the AMQP "
        "host, port 15672) or 'off'",
    )
