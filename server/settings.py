"""The one `Settings` object: the only code in sluice that reads the environment.

Variable names in DESIGN.md's settings table are fixed (users and outside checks rely on them).
Everything else takes a `Settings` instance; nothing calls `os.environ` directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["Settings"]

CommaList = Annotated[list[str], NoDecode]


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_", extra="ignore")

    # Where to listen.
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # Models.
    ollama_urls: CommaList = ["http://127.0.0.1:11434"]
    default_model: str = "smollm2:135m"
    embed_model: str = "all-MiniLM-L6-v2"
    classify_model: str = "zero-shot-minilm"
    # Extra sentence-transformers models: "name=path" pairs.
    extra_embed_models: CommaList = []
    # A local NLI model (path) served through the transformers zero-shot pipeline, as "name=path".
    nli_classify_models: CommaList = []
    load_local_generation: bool = True
    local_max_batch: int = Field(default=8, ge=1, le=64)
    # Torch intra-op threads of each model worker thread (the decode loop, each batcher); 0 = auto:
    # the decode loop takes all cores but one, embed/classify passes take all cores.
    torch_threads: int = Field(default=0, ge=0, le=256)
    cache_dir: Path = Path("~/.cache/sluice").expanduser()

    # Continuous batching of embed and classify: rows and padded tokens (rows x longest) per
    # forward pass, and queued texts before ``overloaded``. No wait: an idle worker runs at once.
    embed_max_batch: int = Field(default=64, ge=1, le=4096)
    embed_max_batch_tokens: int = Field(default=16384, ge=1)
    embed_max_queue: int = Field(default=8192, ge=1)

    # Ollama timeouts, seconds.
    ollama_connect_timeout_s: float = 5.0
    ollama_first_token_timeout_s: float = 120.0
    ollama_idle_timeout_s: float = 60.0
    ollama_retry_unhealthy_s: float = 5.0

    # Auth and origin.
    api_keys: CommaList = []
    allowed_origins: CommaList = []
    ticket_ttl_s: int = 60
    ticket_secret: str = ""

    # Stored OpenAI Responses (`server.api.compat.responses_store`): seconds kept, how many at most.
    responses_ttl_s: int = Field(default=3600, ge=1)
    responses_max: int = Field(default=1024, ge=1)

    # PROTOCOL.md limits.
    session_ttl_s: int = Field(default=120, ge=1)
    replay_events: int = Field(default=4096, ge=16)
    # The log also keeps at least this many bytes of encoded events, whichever holds more (§2).
    replay_bytes: int = Field(default=4 * 1_048_576, ge=0)
    # What all sessions' event logs may hold together, in estimated memory (encoded size plus the
    # message objects); past it the detached sessions' logs are shed first. 0 = no bound.
    max_log_bytes: int = Field(default=1024 * 1_048_576, ge=0)
    max_message_bytes: int = Field(default=1_048_576, ge=1024)
    max_inflight: int = Field(default=64, ge=1)
    # Frames past this close the connection with 1009 (a message past max_message_bytes but
    # under this gets a typed error and the connection goes on).
    max_frame_bytes: int = Field(default=16 * 1_048_576, ge=1024)

    # Per-key limits (0 = unlimited).
    requests_per_minute: int = Field(default=0, ge=0)
    tokens_per_minute: int = Field(default=0, ge=0)
    sessions_per_key: int = Field(default=0, ge=0)

    # Backpressure: outbound bytes buffered per connection before deltas merge, and the hard
    # bound (bytes, or seconds without the peer reading) past which the connection closes 4008.
    outbound_soft_bytes: int = Field(default=256 * 1024, ge=1024)
    outbound_hard_bytes: int = Field(default=4 * 1_048_576, ge=4096)
    outbound_stall_s: float = Field(default=30.0, gt=0.0)
    # A request's delta that comes less than this after its previous one went out is held and
    # merged with what follows, for at most this long (0 = never): fast streams are sent as fewer,
    # larger deltas; a first delta, or one of a stream slower than 1/W tokens per second, never is.
    delta_hold_s: float = Field(default=0.001, ge=0.0, le=0.05)
    # SO_SNDBUF of accepted sockets, bytes; 0 leaves it to the OS (autotuned, up to tcp_wmem's
    # maximum, often 4 MiB). A fixed size bounds the kernel memory a client that stops reading
    # can hold down, and makes the outbound bounds above take effect that much sooner.
    socket_send_buffer_bytes: int = Field(default=0, ge=0)

    # Liveness and shutdown.
    ws_ping_interval_s: float = Field(default=20.0, gt=0.0)
    ws_ping_timeout_s: float = Field(default=20.0, gt=0.0)
    sse_keepalive_s: float = Field(default=15.0, gt=0.0)
    sse_retry_ms: int = Field(default=1000, ge=0)
    drain_timeout_s: float = Field(default=30.0, ge=0.0)

    # Cluster mode.
    redis_url: str = ""
    # This node's id in the cluster (random per process when empty; suffixed per worker).
    node_id: str = Field(default="", max_length=64, pattern=r"^[A-Za-z0-9_.-]*$")

    @field_validator(
        "ollama_urls",
        "api_keys",
        "allowed_origins",
        "extra_embed_models",
        "nli_classify_models",
        mode="before",
    )
    @classmethod
    def _comma_list(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("cache_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()
