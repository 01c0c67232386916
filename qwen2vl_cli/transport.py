"""HTTP for talking to servers: `http(url)` gives the client for a URL. A server on this machine over plain http
(the self-starting session, a local vLLM) is reached through the standard library's http.client: no TLS, no
proxy, and no httpx to import, which was ~60 ms of every later one-liner's ~0.25 s of process on the GPU machine
(2026-12-07). Any other URL goes through httpx (TLS with its CA bundle, the environment's proxies, a connection
pool). Both answer the same calls (`get`, `post`, `stream`) with the same reply (`status_code`, `headers`,
`reason_phrase`, `read()`, `text`, `json()`, `iter_lines()`), and raise TransportError when no answer came."""

from __future__ import annotations

import contextlib
import json
from typing import Iterator

CONNECT_TIMEOUT_S = 10.0
SIZED_HEADER = "X-Qwen2VL-Sized-Media"  # "1": qwen2vl's client sized every image and frame already
# OpenAI's error code for a prompt (+ max_tokens) over the context: to qwen2vl's client, the usage error (exit 2)
# the same request gets in process
TOO_LONG = "context_length_exceeded"


def is_loopback(host: str) -> bool:
    """'localhost', 127.0.0.0/8 or ::1 (brackets allowed)."""
    import ipaddress

    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class TransportError(Exception):
    """No answer: the server could not be reached, timed out, or cut the connection."""


_CLIENTS: dict = {}


def http(url: str):
    """This process's client for `url`: http.client for plain http on a loopback address; httpx otherwise, one
    connection pool for every call, no TLS context for plain http (loading the CA certificates cost a one-liner
    ~0.1 s) and no proxy for a loopback address (HTTP_PROXY and the like name a proxy for other hosts)."""
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    key = (parts.scheme == "https", is_loopback(parts.hostname or ""))
    if key not in _CLIENTS:
        _CLIENTS.setdefault(key, _Local() if key == (False, True) else _Httpx(*key))
    return _CLIENTS[key]


class _Httpx:
    """httpx, its errors turned into TransportError."""

    def __init__(self, tls: bool, loopback: bool) -> None:
        import httpx

        self._httpx = httpx
        self._client = httpx.Client(verify=tls, trust_env=not loopback)

    def _timeout(self, timeout: float):
        return self._httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT_S))

    def get(self, url: str, *, timeout: float, headers: dict | None = None):
        with self._errors():
            return self._client.get(url, timeout=self._timeout(timeout), headers=headers)

    def post(self, url: str, *, json: dict, timeout: float, headers: dict | None = None):
        with self._errors():
            return self._client.post(url, json=json, timeout=self._timeout(timeout), headers=headers)

    @contextlib.contextmanager
    def stream(self, method: str, url: str, *, json: dict, timeout: float, headers: dict | None = None):
        with self._errors(), self._client.stream(method, url, json=json, timeout=self._timeout(timeout),
                                                 headers=headers) as response:
            yield response

    @contextlib.contextmanager
    def _errors(self):
        try:
            yield
        except self._httpx.HTTPError as exc:
            raise TransportError(type(exc).__name__) from exc


class _Local:
    """http.client to a server on this machine: a connection a request, closed with its reply."""

    def get(self, url: str, *, timeout: float, headers: dict | None = None) -> "_Reply":
        with self.stream("GET", url, json=None, timeout=timeout, headers=headers) as reply:
            reply.read()
            return reply

    def post(self, url: str, *, json: dict, timeout: float, headers: dict | None = None) -> "_Reply":
        with self.stream("POST", url, json=json, timeout=timeout, headers=headers) as reply:
            reply.read()
            return reply

    @contextlib.contextmanager
    def stream(self, method: str, url: str, *, json: dict | None, timeout: float,
               headers: dict | None = None) -> Iterator["_Reply"]:
        import http.client
        import json as json_module
        import urllib.parse

        parts = urllib.parse.urlsplit(url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        body = None if json is None else json_module.dumps(json).encode()
        sent = {"Host": parts.netloc, **({"Content-Type": "application/json"} if body is not None else {}),
                **(headers or {})}
        connection = http.client.HTTPConnection(parts.hostname, parts.port or 80,
                                                timeout=min(timeout, CONNECT_TIMEOUT_S))
        try:
            try:
                connection.connect()
                connection.sock.settimeout(timeout)  # connected: each read may now take the request's timeout
                connection.request(method, path, body=body, headers=sent)
                reply = _Reply(connection.getresponse())
            except (OSError, http.client.HTTPException) as exc:
                raise TransportError(type(exc).__name__) from exc
            try:
                yield reply
            except (OSError, http.client.HTTPException) as exc:  # while the caller reads the reply
                raise TransportError(type(exc).__name__) from exc
        finally:
            connection.close()


class _Reply:
    """An http.client response as the callers read an httpx one."""

    def __init__(self, response) -> None:
        self._response = response
        self.status_code = response.status
        self.reason_phrase = response.reason
        self.headers = response.headers  # case-insensitive .get, as httpx's
        self._body: bytes | None = None

    def read(self) -> bytes:
        if self._body is None:
            self._body = self._response.read()
        return self._body

    @property
    def text(self) -> str:
        return self.read().decode("utf-8", "replace")

    def json(self):
        return json.loads(self.read())

    def iter_lines(self) -> Iterator[str]:
        """Each line as it arrives (a server-sent event's `data: ...` the moment it is sent)."""
        for line in self._response:
            yield line.decode("utf-8").rstrip("\r\n")
