"""What a server is started with: `ServerConfig`, made by `serve`'s options or by a command starting a session
for itself, and handed as it is to a session it starts (registry.Launched). Light: no server imports."""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..sources import FetchLimits, FetchPolicy
from ..transport import is_loopback
from ..types import ModelSpec
from .registry import DEFAULT_PORT

DEFAULT_MAX_BODY = 100 * 1024 * 1024
DEFAULT_MAX_QUEUE = 64
LISTEN_BACKLOG = 2048  # uvicorn's own


@dataclass(frozen=True)
class ServerConfig:
    spec: ModelSpec
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_key: str | None = None
    keep_alive_s: float | None = 600.0
    max_body: int = DEFAULT_MAX_BODY
    allowed_local: Path | None = None
    limits: FetchLimits = FetchLimits(policy=FetchPolicy())  # with its fetch policy (this one: no URL is fetched)
    served_name: str | None = None
    max_prompt_tokens: int | None = None  # None: the model's context
    max_images: int = 32
    max_videos: int = 4
    max_queue: int = DEFAULT_MAX_QUEUE
    allowed_hosts: tuple[str, ...] = ()  # Host headers answered; () derives them from the bind address
    exit_when_idle: bool = False  # a session a command started: the process ends after keep_alive_s idle
    private: bool = False  # its api_key was made by the command that started it, for its user's commands only: its
    # state file (the user's alone) records it, and whoever else reaches the port gets a 401

    def __post_init__(self) -> None:
        if not is_loopback(self.host) and not self.api_key:  # refused before anything starts, in the background too
            raise UsageError(f"--host {self.host}", "binding beyond loopback needs an API key "
                                                    "(--api-key or QWEN2VL_API_KEY)")

    @property
    def model_name(self) -> str:
        return self.served_name or self.spec.model

    def listen(self) -> socket.socket:
        """The server's socket, bound and listening (before the model loads: a taken port is a usage error at once,
        and a client that connects while the model loads waits in its queue for it rather than being refused).
        A started session's starter binds it and hands it over: the same error there as in the foreground."""
        # IPPROTO_TCP named: asyncio turns Nagle's algorithm off only on sockets that say they are TCP (proto 0 does
        # not); with it on, every response after a connection's first waited ~40 ms for the client's delayed ACK
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it (uvloop's too)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            in_use = exc.errno == errno.EADDRINUSE
            hint = " (`qwen2vl ps` lists qwen2vl's sessions; --port 0 picks a free port)" if in_use else ""
            raise UsageError(f"{self.host}:{self.port}", (exc.strerror or str(exc)) + hint) from None
        sock.listen(LISTEN_BACKLOG)
        return sock

    def hosts(self) -> set[str] | None:
        """The Host names requests may carry (None: any): loopback names on loopback, the address bound to,
        any on a wildcard bind (whose clients need the API key)."""
        if self.allowed_hosts:
            return None if "*" in self.allowed_hosts else {h.lower() for h in self.allowed_hosts}
        if is_loopback(self.host):
            return {"localhost", "127.0.0.1", "::1"}
        if self.host in ("0.0.0.0", "::", ""):
            return None
        return {self.host.lower()}
