"""The one input resolver: any source string (path, file:// or http(s) URL, data URI, bare base64,
`-` for stdin) becomes bytes, then a decoded RGB image resized the qwen-vl-utils way.

Every failure raises `InputError(source, reason)`; nothing here imports torch.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import re
import stat
import sys
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .errors import InputError

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_DOWNLOAD = 100 * 1024 * 1024
MAX_ASPECT_RATIO = 200  # qwen-vl-utils' MAX_RATIO
PATCH_FACTOR = 28  # patch 14 x spatial merge 2: one LLM token per 28x28 pixels
IMAGE_MIN_PIXELS = 4 * PATCH_FACTOR ** 2  # qwen-vl-utils' image bounds: 4 to 16384 tokens
IMAGE_MAX_PIXELS = 16384 * PATCH_FACTOR ** 2

_BASE64_RE = re.compile(r"^[A-Za-z0-9+/_\-\s]+={0,2}\s*$")
_PLAIN_PNM_RE = re.compile(rb"P[1-3]\s")
DIRECTORY = "is a directory, not a file (`qwen2vl batch DIR` captions a folder; `qwen2vl video DIR` reads its frames)"
HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"}


@dataclass(frozen=True)
class FetchPolicy:
    """Which URLs a server fetches for its clients (the command line fetches what its user names).

    By default none. `domains` (--allowed-media-domains): these hosts, exactly as named, wherever they
    resolve (the operator vouches for them). `allow` (--allow-fetch): any host whose every address is
    public: loopback, private, link-local and reserved addresses are refused after DNS resolution, on the
    first request and on every redirect."""

    allow: bool = False
    domains: tuple[str, ...] = ()

    def permits(self, host: str) -> bool:
        return self.allow or host.lower().rstrip(".") in self.domains


@dataclass(frozen=True)
class FetchLimits:
    """How long and how much a URL download may take, and (in a server) which URLs it may fetch at all."""

    timeout: float = DEFAULT_TIMEOUT_S
    max_bytes: int = DEFAULT_MAX_DOWNLOAD
    policy: FetchPolicy | None = None  # None: any URL (the user's own command)


@dataclass(frozen=True)
class ImageOptions:
    """Resolution settings, as qwen-vl-utils takes them per image."""

    min_pixels: int | None = None
    max_pixels: int | None = None
    resized_height: int | None = None
    resized_width: int | None = None


def display_name(source: str) -> str:
    """A short name for messages: data URIs and base64 are not echoed whole."""
    if source.startswith("data:"):
        return source.split(",", 1)[0] + ",..."
    if len(source) > 80 and looks_like_base64(source):
        return f"base64 ({len(source)} chars)"
    if len(source) > 300:  # a payload that is not quite base64 (cut short, pasted with extra text) is no name
        return f"{source[:40]}... ({len(source)} chars)"
    return source


def looks_like_base64(source: str) -> bool:
    """True when a string that is not a path reads as base64 payload. One that starts with "/" is taken for a
    missing file, unless it starts as every JPEG's base64 does ("/9j/": the bytes FF D8 FF)."""
    return (len(source) >= 64 and (not source.startswith("/") or source.startswith("/9j/"))
            and bool(_BASE64_RE.match(source)))


def read_source(source: str, limits: FetchLimits = FetchLimits(), stdin: BinaryIO | None = None) -> bytes:
    """Return the raw bytes behind `source`, or raise InputError; nothing reads more than limits.max_bytes."""
    refuse_empty(source)
    if source == "-":
        return as_sent(read_stdin(limits, stdin))
    if source.startswith("data:"):
        return decode_data_uri(source)
    scheme = scheme_of(source)
    if scheme in ("http", "https"):
        return download(source, limits)
    if scheme == "file":
        return read_local(file_url_to_path(source), source, limits.max_bytes)
    refuse_other_urls(source, scheme)
    if not os.path.lexists(os.path.expanduser(source)) and looks_like_base64(source):
        return decode_base64(source, "base64 input")
    return read_local(Path(os.path.expanduser(source)), display_name(source), limits.max_bytes)


def scheme_of(source: str) -> str:
    """A source's URL scheme, lowercase ('' for a path), or an InputError for a URL that does not parse."""
    try:
        return urllib.parse.urlsplit(source).scheme.lower()
    except ValueError as exc:  # "http://[::1": an unclosed IPv6 address
        raise InputError(display_name(source), f"not a valid URL ({exc})") from None


def encodable(text: str) -> bool:
    """Whether `text` is Unicode a tokenizer takes: not bytes of another encoding (surrogate escapes, as Python reads
    them from argv or a file) nor JSON's unpaired "\\ud800" escapes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def refuse_empty(source: str) -> None:
    """An empty source (an unset shell variable, "$PHOTO") is an InputError, not the current directory it names."""
    if not source:
        raise InputError("''", "an empty source (an unset variable?): give a path, a URL, a data URI or - for stdin")


def refuse_other_urls(source: str, scheme: str) -> None:
    """An ftp://, s3://... source that is no local path: an InputError saying so (rather than "no such file")."""
    if scheme and "://" in source and not os.path.lexists(os.path.expanduser(source)):
        raise InputError(display_name(source), f"{scheme} URLs are not read (http, https, file and data are)")


def read_stdin(limits: FetchLimits, stdin: BinaryIO | None = None) -> bytes:
    """Standard input, whole, under the size cap; a closed stdin is an input error, not a crash."""
    stream = stdin if stdin is not None else getattr(sys.stdin, "buffer", None)
    try:
        if stream is None:
            raise OSError("closed")
        if stream.isatty():  # nothing piped in: reading would wait for the keyboard, silently
            raise InputError("stdin", "is a terminal: pipe the image or video in (cat photo.jpg | qwen2vl describe -)")
        data = stream.read(limits.max_bytes + 1)
    except (OSError, ValueError):
        raise InputError("stdin", "closed or unreadable") from None
    if len(data) > limits.max_bytes:
        raise InputError("stdin", f"more than {limits.max_bytes} bytes (raise --max-download)")
    if not data:
        raise InputError("stdin", "empty (0 bytes)")
    return data


def as_sent(data: bytes) -> bytes:
    """Standard input's bytes (an image's or a video's), also where it holds them as text: a data URI, or base64 (what
    `base64 photo.jpg` prints, lines wrapped). Only a plain-text PNM image ("P3", then numbers) is all base64
    characters: it stays as it is."""
    if data[:64].lstrip().startswith(b"data:"):
        return decode_data_uri(data.strip().decode("ascii", "replace"), "stdin")
    if data.isascii() and data.strip() and _BASE64_RE.match(data.decode("ascii")) and not _PLAIN_PNM_RE.match(data):
        return decode_base64(data.decode("ascii"), "stdin")
    return data


def file_url_to_path(url: str) -> Path:
    """file:///a/b%20c.jpg -> /a/b c.jpg (also file://localhost/...)."""
    from urllib.request import url2pathname  # here: urllib.request is 20 ms of every command's start

    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise InputError(url, f"file:// URL names another host ({parts.netloc})")
    return Path(url2pathname(parts.path))


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
        raise InputError(name, DIRECTORY) from None
    except OSError as exc:
        raise InputError(name, exc.strerror or str(exc)) from None
    mode, size = (info := os.fstat(fd)).st_mode, info.st_size
    reason = DIRECTORY if stat.S_ISDIR(mode) else next(
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


def decode_data_uri(uri: str, name: str | None = None) -> bytes:
    """data:[<mediatype>][;param=value]*[;base64],<payload> (RFC 2397)."""
    name = name or display_name(uri)
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
    """Strict base64 (standard or URL-safe alphabet, whitespace and missing padding tolerated). A payload as
    clients send it (no escapes, no whitespace) is decoded in one pass; megabytes of it are a server's every
    request."""
    text = urllib.parse.unquote(payload) if "%" in payload else payload
    if "-" in text or "_" in text:
        text = text.replace("-", "+").replace("_", "/")
    try:
        data = _strict_base64(text)
    except (binascii.Error, ValueError):
        try:  # whitespace is stripped only where the plain text fails
            data = _strict_base64(re.sub(r"\s+", "", text))
        except (binascii.Error, ValueError):
            raise InputError(name, "invalid base64 data") from None
    if not data:
        raise InputError(name, "empty base64 payload")
    return data


def _strict_base64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


class FetchRefused(InputError):
    """A URL the server's fetch policy does not allow: one text whatever the reason (host not allowed,
    a private address behind a public name, a redirect to one), so that refusals reveal nothing."""

    def __init__(self, url: str) -> None:
        super().__init__(display_name(url), "not fetched: this server fetches only allowed public URLs "
                                            "(send the image or video as a data URI)")


def download(url: str, limits: FetchLimits) -> bytes:
    """GET an http(s) URL under one deadline for the whole transfer (--timeout) and a size cap.

    The transfer runs on a helper thread: a server that drips a byte at a time cannot hold us past the
    deadline; the helper stops at its next chunk once we have given up on it."""
    if limits.policy is not None and not limits.policy.permits(urllib.parse.urlsplit(url).hostname or ""):
        raise FetchRefused(url)
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

    guarded = {} if limits.policy is None else {"transport": _guarded_transport(limits.policy), "trust_env": False}
    try:
        with httpx.Client(timeout=limits.timeout, follow_redirects=True, headers={"User-Agent": "qwen2vl-cli"},
                          **guarded) as client, client.stream("GET", url) as response:
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
    except FetchRefused:
        raise FetchRefused(url) from None  # named after the URL asked for, not the redirect
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


def _guarded_transport(policy: FetchPolicy):
    """An httpx transport whose every connection (redirects included) goes to a vetted address: the
    host must be permitted, and unless named in policy.domains, every address it resolves to public.
    The connection is made to the address that was checked, so a second DNS answer cannot differ."""
    import socket

    import httpcore

    from .compat import transport_through

    class Vetted(httpcore.SyncBackend):
        def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
            if not policy.permits(host):
                raise FetchRefused(host)
            address = host
            if host.lower().rstrip(".") not in policy.domains:
                try:
                    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                except OSError:
                    raise httpcore.ConnectError(f"cannot resolve {host}") from None
                addresses = [info[4][0] for info in found]
                if not addresses or not all(map(is_public_address, addresses)):
                    raise FetchRefused(host)
                address = addresses[0]
            return super().connect_tcp(address, port, timeout, local_address, socket_options)

    return transport_through(Vetted())


def is_public_address(address: str) -> bool:
    """A globally routable unicast address (IPv4-mapped IPv6 judged as the IPv4 address it carries)."""
    import ipaddress

    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _first_line(exc: BaseException) -> str:
    """The error's first line in its own words: "Name or service not known", not "[Errno -2] Name or ..."."""
    text = str(exc).strip()
    return re.sub(r"^\[Errno -?\d+\]\s*", "", text.splitlines()[0]) if text else ""


def decode_image(data: bytes, name: str, own: bool = False):
    """Decode image bytes fully (so truncation shows now), respect EXIF orientation, check limits. `own`: the
    user's own input, taken up to Pillow's hard limit (~179 MP: a 100 MP camera's photo, a scanned panorama, as
    the seed recipe takes them); a server's request only up to the size Pillow warns at (~89 MP)."""
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    if is_heif(data):  # a phone's HEIC photo: Pillow reads it through pillow-heif
        _read_heif(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if own else "error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            limit = Image.MAX_IMAGE_PIXELS * (2 if own else 1)
            raise InputError(name, f"image is too large to decode safely (over {limit} pixels; a decompression "
                                   "bomb?)") from None
        except UnidentifiedImageError:
            if is_video(data):
                raise InputError(name, "a video, not an image: give it as one (`qwen2vl video`, `ask --video`, a "
                                       "video_url part; `batch` reads files named .mp4, .mov, .m4v, .mkv, .webm or "
                                       ".avi as videos)") from None
            raise InputError(name, "not an image (or an unsupported format)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            reason = _first_line(exc)
            if "truncated" in reason.lower():
                raise InputError(name, "truncated image") from None
            raise InputError(name, f"corrupt image ({reason or type(exc).__name__})") from None
    ImageOps.exif_transpose(image, in_place=True)  # not in place, an upright image is copied (7 ms a photo)
    width, height = image.size
    if max(width, height) / max(1, min(width, height)) > MAX_ASPECT_RATIO:
        raise InputError(name, f"aspect ratio {width}x{height} is over {MAX_ASPECT_RATIO}:1, "
                               "which Qwen2-VL cannot take")
    return image


def is_heif(data: bytes) -> bool:
    """HEIC/HEIF bytes (an ISO media file of a HEIF brand), not AVIF (same container, also "mif1" at times, which
    Pillow reads itself: its brands name avif)."""
    if data[4:8] != b"ftyp" or data[8:12] not in HEIF_BRANDS:
        return False
    brands = data[8:max(16, min(int.from_bytes(data[:4], "big"), 256))]
    return b"avif" not in brands and b"avis" not in brands


def is_video(data: bytes) -> bool:
    """Bytes of a video container: MP4/MOV (an ISO media file of no image brand), Matroska/WebM, AVI."""
    if data[4:8] == b"ftyp":
        return data[8:12] not in HEIF_BRANDS and data[8:12] not in (b"avif", b"avis")
    return data[:4] == b"\x1a\x45\xdf\xa3" or (data[:4] == b"RIFF" and data[8:12] == b"AVI ")


def _read_heif(name: str) -> None:
    """Pillow opens HEIC/HEIF from now on (pillow-heif's opener registered: a table entry, the same each time), or
    the InputError saying what to install. Only where such bytes come: the import is 40 ms."""
    try:
        import pillow_heif
    except ImportError:
        raise InputError(name, "a HEIC/HEIF image: reading it needs pillow-heif "
                               "(pip install 'qwen2vl-cli[heif]')") from None
    pillow_heif.register_heif_opener()


def fit_size(width: int, height: int, options: ImageOptions = ImageOptions()) -> tuple[int, int]:
    """The (width, height) qwen-vl-utils' fetch_image resizes an image to: multiples of 28, the pixel count
    within [min_pixels, max_pixels] (default 4 to 16384 tokens), the aspect ratio kept. Its smart_resize,
    restated here because importing qwen-vl-utils imports torch and torchvision (the client mode must
    not); tests check the two agree."""
    factor = PATCH_FACTOR
    if options.resized_height and options.resized_width:
        height, width, low, high = options.resized_height, options.resized_width, 4 * factor ** 2, 16384 * factor ** 2
    else:
        low = options.min_pixels if options.min_pixels is not None else IMAGE_MIN_PIXELS
        high = options.max_pixels if options.max_pixels is not None else IMAGE_MAX_PIXELS
    if high < low:
        raise ValueError("The max_pixels of image must be greater than or equal to min_pixels.")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}")
    h_bar, w_bar = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h_bar * w_bar > high:
        beta = math.sqrt(height * width / high)
        h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < low:
        beta = math.sqrt(low / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    if not (h_bar and w_bar):
        raise ValueError(f"{width}x{height} is too narrow to fit max_pixels {high} at 28-pixel multiples")
    return w_bar, h_bar


def prepare_image(image, options: ImageOptions, name: str):
    """RGB (alpha onto white) and resized to multiples of 28 within the pixel bounds: what qwen-vl-utils'
    fetch_image makes of it, pixel for pixel (Pillow's bicubic), without importing torch."""
    return resized(image, checked_size(image, options, name))


def checked_size(image, options: ImageOptions, name: str) -> tuple[int, int]:
    """fit_size of a decoded image, or the InputError saying why it cannot be sized."""
    try:
        return fit_size(*image.size, options)
    except ValueError as exc:
        raise InputError(name, _first_line(exc)) from None


def resized(image, size: tuple[int, int]):
    """RGB (to_rgb), resized to `size` with Pillow's bicubic (the same size: a copy)."""
    from PIL import Image

    return to_rgb(image).resize(size, Image.Resampling.BICUBIC)


def to_rgb(image):
    """RGB, an alpha channel composited onto white (qwen-vl-utils' to_rgb)."""
    from PIL import Image

    if image.mode == "RGB":
        return image  # convert() would copy it
    if image.mode != "RGBA":
        return image.convert("RGB")
    rgb = Image.new("RGB", image.size, (255, 255, 255))
    rgb.paste(image, mask=image.split()[3])
    return rgb


def on_grid(width: int, height: int) -> bool:
    """Sized for the model already: both sides multiples of 28, at most 16384 tokens."""
    return not (width % PATCH_FACTOR or height % PATCH_FACTOR) and width * height <= IMAGE_MAX_PIXELS


@dataclass
class SourceImage:
    """An image as its source gave it (the bytes, decoded and checked: every input error is known) and the size
    the model sees it at. `sized()` resizes it (once); a qwen2vl server can be sent the bytes and the size
    instead, and resizes them by the same code."""

    name: str
    data: bytes
    decoded: object  # the PIL image, upright
    size: tuple[int, int]  # (width, height) the model sees: fit_size of the options
    _sized: object = field(default=None, repr=False, compare=False)

    @property
    def facts(self) -> dict:
        """What the model sees of it: width, height and tokens (one per 28x28 patch)."""
        width, height = self.size
        return {"width": width, "height": height, "tokens": width * height // PATCH_FACTOR ** 2}

    def sized(self):
        """The RGB image the processor takes (prepare_image's, at the size found at reading)."""
        if self._sized is None:
            self._sized = resized(self.decoded, self.size)
        return self._sized


def read_image(source: str, options: ImageOptions = ImageOptions(), limits: FetchLimits = FetchLimits(),
               stdin: BinaryIO | None = None, sized: bool = False) -> SourceImage:
    """Any image source -> a SourceImage (read, decoded, its size checked), or InputError. `sized`: a qwen2vl
    client sized it already (a server's request), so one on the grid is taken at the size it has."""
    name = display_name(source)
    said = "stdin" if source == "-" else name  # in errors ("-" in what it answers, as given)
    own = limits.policy is None  # no fetch policy: the user's own command, not a server's request
    decoded = decode_image(data := read_source(source, limits, stdin), said, own)
    size = decoded.size if sized and on_grid(*decoded.size) else checked_size(decoded, options, said)
    return SourceImage(name, data, decoded, size)


def resolve_image(source: str, options: ImageOptions = ImageOptions(), limits: FetchLimits = FetchLimits(),
                  stdin: BinaryIO | None = None):
    """Any image source -> an RGB PIL image ready for the processor, or InputError."""
    return read_image(source, options, limits, stdin).sized()
