"""The one input resolver: any source string (path, file:// or http(s) URL, data URI, bare base64,
`-` for stdin) becomes bytes, then a decoded RGB image resized the qwen-vl-utils way.

Every failure raises `InputError(source, reason)`; nothing here imports torch.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import stat
import sys
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .errors import InputError

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_DOWNLOAD = 100 * 1024 * 1024
MAX_ASPECT_RATIO = 200  # qwen-vl-utils' MAX_RATIO
PATCH_FACTOR = 28  # patch 14 x spatial merge 2: one LLM token per 28x28 pixels

_BASE64_RE = re.compile(r"^[A-Za-z0-9+/_\-\s]+={0,2}\s*$")


@dataclass(frozen=True)
class FetchLimits:
    """How long and how much a URL download may take."""

    timeout: float = DEFAULT_TIMEOUT_S
    max_bytes: int = DEFAULT_MAX_DOWNLOAD


@dataclass(frozen=True)
class ImageOptions:
    """Resolution settings, as qwen-vl-utils takes them per image."""

    min_pixels: int | None = None
    max_pixels: int | None = None
    resized_height: int | None = None
    resized_width: int | None = None

    def as_vision_kwargs(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def display_name(source: str) -> str:
    """A short name for messages: data URIs and base64 are not echoed whole."""
    if source.startswith("data:"):
        return source.split(",", 1)[0] + ",..."
    if len(source) > 80 and looks_like_base64(source):
        return f"base64 ({len(source)} chars)"
    return source


def looks_like_base64(source: str) -> bool:
    """True when a string that is not a path reads as base64 payload."""
    return len(source) >= 64 and "/" not in source[:1] and bool(_BASE64_RE.match(source))


def read_source(source: str, limits: FetchLimits = FetchLimits(), stdin: BinaryIO | None = None) -> bytes:
    """Return the raw bytes behind `source`, or raise InputError; nothing reads more than limits.max_bytes."""
    if source == "-":
        return read_stdin(limits, stdin)
    if source.startswith("data:"):
        return decode_data_uri(source)
    scheme = urllib.parse.urlsplit(source).scheme.lower()
    if scheme in ("http", "https"):
        return download(source, limits)
    if scheme == "file":
        return read_local(file_url_to_path(source), source, limits.max_bytes)
    if not os.path.lexists(os.path.expanduser(source)) and looks_like_base64(source):
        return decode_base64(source, "base64 input")
    return read_local(Path(os.path.expanduser(source)), source, limits.max_bytes)


def read_stdin(limits: FetchLimits, stdin: BinaryIO | None = None) -> bytes:
    """Standard input, whole, under the size cap; a closed stdin is an input error, not a crash."""
    stream = stdin if stdin is not None else getattr(sys.stdin, "buffer", None)
    try:
        if stream is None:
            raise OSError("closed")
        data = stream.read(limits.max_bytes + 1)
    except (OSError, ValueError):
        raise InputError("stdin", "closed or unreadable") from None
    if len(data) > limits.max_bytes:
        raise InputError("stdin", f"more than {limits.max_bytes} bytes (raise --max-download)")
    if not data:
        raise InputError("stdin", "empty (0 bytes)")
    return data


def file_url_to_path(url: str) -> Path:
    """file:///a/b%20c.jpg -> /a/b c.jpg (also file://localhost/...)."""
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise InputError(url, f"file:// URL names another host ({parts.netloc})")
    return Path(urllib.request.url2pathname(parts.path))


_NOT_REGULAR = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def open_regular(path: Path, name: str) -> int:
    """An open descriptor on a regular, non-empty file, or InputError: directories, FIFOs (which would block
    until a writer came) and devices (/dev/zero never ends) are refused before a byte is read."""
    try:  # O_NONBLOCK: opening a FIFO nobody writes to returns at once instead of hanging
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InputError(name, "no such file") from None
    except PermissionError:
        raise InputError(name, "permission denied") from None
    except IsADirectoryError:
        raise InputError(name, "is a directory, not a file") from None
    except OSError as exc:
        raise InputError(name, exc.strerror or str(exc)) from None
    mode, size = (info := os.fstat(fd)).st_mode, info.st_size
    reason = "is a directory, not a file" if stat.S_ISDIR(mode) else next(
        (f"is {what}, not a regular file" for test, what in _NOT_REGULAR if test(mode)), None)
    if reason is None and not size:
        reason = "empty file (0 bytes)"
    if reason:
        os.close(fd)
        raise InputError(name, reason)
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return fd


def check_regular(path: Path, name: str) -> None:
    """The checks of open_regular for a file another library will read (videos): InputError or nothing."""
    os.close(open_regular(path, name))


def read_local(path: Path, name: str, max_bytes: int = DEFAULT_MAX_DOWNLOAD) -> bytes:
    """A regular file's bytes, at most max_bytes, with clear reasons for the usual failures."""
    fd = open_regular(path, name)
    try:
        with os.fdopen(fd, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > max_bytes:
                raise InputError(name, f"too large ({size} bytes, limit {max_bytes}; raise --max-download)")
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise InputError(name, exc.strerror or str(exc)) from None
    if len(data) > max_bytes:  # it grew while we read
        raise InputError(name, f"too large (over {max_bytes} bytes; raise --max-download)")
    return data


def decode_data_uri(uri: str) -> bytes:
    """data:[<mediatype>][;param=value]*[;base64],<payload> (RFC 2397)."""
    name = display_name(uri)
    header, sep, payload = uri[5:].partition(",")
    if not sep:
        raise InputError(name, "data URI has no ',' before its payload")
    params = [p.strip().lower() for p in header.split(";")]
    if "base64" in params[1:]:
        return decode_base64(payload, name)
    data = urllib.parse.unquote_to_bytes(payload)
    if not data:
        raise InputError(name, "empty data URI")
    return data


def decode_base64(payload: str, name: str) -> bytes:
    """Strict base64 (standard or URL-safe alphabet, whitespace and missing padding tolerated)."""
    text = re.sub(r"\s+", "", urllib.parse.unquote(payload))
    if "-" in text or "_" in text:
        text = text.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(name, "invalid base64 data") from None
    if not data:
        raise InputError(name, "empty base64 payload")
    return data


def download(url: str, limits: FetchLimits) -> bytes:
    """GET an http(s) URL under one deadline for the whole transfer (--timeout) and a size cap.

    The transfer runs on a helper thread: a server that drips a byte at a time cannot hold us past the
    deadline; the helper stops at its next chunk once we have given up on it."""
    outcome: dict = {}
    cancelled = threading.Event()

    def fetch() -> None:
        try:
            outcome["data"] = _fetch(url, limits, cancelled)
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=fetch, name="qwen2vl-download", daemon=True)
    worker.start()
    worker.join(limits.timeout)
    if worker.is_alive():
        cancelled.set()
        raise InputError(url, f"timed out after {limits.timeout:g}s (--timeout)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["data"]


def _fetch(url: str, limits: FetchLimits, cancelled: threading.Event) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=limits.timeout, follow_redirects=True,
                          headers={"User-Agent": "qwen2vl-cli"}) as response:
            if response.status_code >= 400:
                raise InputError(url, f"HTTP {response.status_code} {response.reason_phrase}".strip())
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > limits.max_bytes:
                raise InputError(url, f"too large ({int(declared)} bytes, limit {limits.max_bytes}; "
                                      "raise --max-download)")
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                if cancelled.is_set():
                    raise InputError(url, "cancelled")
                size += len(chunk)
                if size > limits.max_bytes:
                    raise InputError(url, f"too large (over {limits.max_bytes} bytes; raise --max-download)")
                chunks.append(chunk)
    except httpx.TimeoutException:
        raise InputError(url, f"timed out after {limits.timeout:g}s (--timeout)") from None
    except httpx.ConnectError as exc:
        raise InputError(url, f"cannot connect ({_first_line(exc) or 'unreachable'})") from None
    except httpx.HTTPError as exc:
        raise InputError(url, f"download failed ({_first_line(exc) or type(exc).__name__})") from None
    data = b"".join(chunks)
    if not data:
        raise InputError(url, "empty response (0 bytes)")
    return data


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def decode_image(data: bytes, name: str):
    """Decode image bytes fully (so truncation shows now), respect EXIF orientation, check limits."""
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise InputError(name, f"image is too large to decode safely (over {Image.MAX_IMAGE_PIXELS} "
                                   "pixels; a decompression bomb?)") from None
        except UnidentifiedImageError:
            raise InputError(name, "not an image (or an unsupported format)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            reason = _first_line(exc)
            if "truncated" in reason.lower():
                raise InputError(name, "truncated image") from None
            raise InputError(name, f"corrupt image ({reason or type(exc).__name__})") from None
    image = ImageOps.exif_transpose(image)
    width, height = image.size
    if max(width, height) / max(1, min(width, height)) > MAX_ASPECT_RATIO:
        raise InputError(name, f"aspect ratio {width}x{height} is over {MAX_ASPECT_RATIO}:1, "
                               "which Qwen2-VL cannot take")
    return image


def prepare_image(image, options: ImageOptions, name: str):
    """RGB (alpha onto white) and resized to multiples of 28 within the pixel bounds, by qwen-vl-utils."""
    from qwen_vl_utils import fetch_image

    try:
        return fetch_image({"image": image, **options.as_vision_kwargs()})
    except (ValueError, AssertionError) as exc:
        raise InputError(name, _first_line(exc) or "cannot be resized") from None


def resolve_image(source: str, options: ImageOptions = ImageOptions(), limits: FetchLimits = FetchLimits(),
                  stdin: BinaryIO | None = None):
    """Any image source -> an RGB PIL image ready for the processor, or InputError."""
    name = display_name(source)
    return prepare_image(decode_image(read_source(source, limits, stdin), name), options, name)
