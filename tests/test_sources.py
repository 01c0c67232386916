"""Every source kind gives the plain path's answer; every bad input gives exit 3 and one line."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from qwen2vl_cli.sources import ImageOptions, resolve_image

from .conftest import noise_image


def one_error_line(result, *needles: str) -> None:
    """The error is one line, names the input and the reason, and carries no traceback."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("qwen2vl: error: ")
    assert "Traceback" not in result.stderr and result.stdout == ""
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def reference(tiny_model, images):
    """The answer for images['a'] given as a plain path."""
    from typer.testing import CliRunner

    from qwen2vl_cli.cli import app

    result = CliRunner().invoke(app, ["describe", str(images["a"]), "-n", "12", "--model", str(tiny_model)])
    assert result.exit_code == 0, result.stderr
    return result.stdout


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


@pytest.mark.parametrize("form", [
    "file_url", "data_uri", "data_uri_params", "data_uri_image_only", "bare_base64", "urlsafe_base64",
])
def test_source_forms_equal_the_path(cli, images, reference, form):
    path = images["a"]
    source = {
        "file_url": path.as_uri(),
        "data_uri": f"data:image/png;base64,{b64(path)}",
        "data_uri_params": f"data:image/png;charset=utf-8;name=a.png;base64,{b64(path)}",
        "data_uri_image_only": f"data:image;base64,{b64(path)}",  # the model card's form
        "bare_base64": b64(path),
        "urlsafe_base64": base64.urlsafe_b64encode(path.read_bytes()).decode().rstrip("="),
    }[form]
    result = cli("describe", source, "-n", "12")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == reference


def test_bare_base64_of_a_jpeg_equals_its_path(cli, images, tmp_path):
    """A JPEG's base64 starts with "/" ("/9j/"), as an absolute path does: still read as the image."""
    from PIL import Image

    path = tmp_path / "a.jpg"
    Image.open(images["a"]).convert("RGB").save(path, quality=90)
    by_path, by_base64 = (cli("describe", source, "-n", "12") for source in (path, b64(path)))
    assert b64(path).startswith("/9j/")
    assert by_path.exit_code == by_base64.exit_code == 0, by_base64.stderr
    assert by_base64.stdout == by_path.stdout
    missing = cli("describe", "/" + "A" * 80, "-n", "2")  # a missing path that reads as base64 is still missing
    assert missing.exit_code == 3 and "no such file" in missing.stderr


def test_stdin_equals_the_path(cli, images, reference):
    result = cli("describe", "-", "-n", "12", input=images["a"].read_bytes())
    assert result.exit_code == 0, result.stderr
    assert result.stdout == reference


def test_stdin_as_text_equals_the_path(cli, images, reference, tmp_path):
    """Standard input holding the image as text (what `base64 photo.png` prints, wrapped at 76 columns, or a data URI
    with the newline `echo` adds) is the same image; text that is neither is the one-line error naming stdin."""
    import base64
    import textwrap

    payload = base64.b64encode(images["a"].read_bytes()).decode()
    for text in ("\n".join(textwrap.wrap(payload, 76)) + "\n", f"data:image/png;base64,{payload}\n"):
        result = cli("describe", "-", "-n", "12", input=text.encode())
        assert result.exit_code == 0, result.stderr
        assert result.stdout == reference
    plain = tmp_path / "plain.ppm"  # a plain-text PNM is all base64 characters, and still the image it is
    plain.write_text("P3\n2 2\n255\n255 0 0  0 255 0\n0 0 255  255 255 255\n")
    by_path, by_stdin = cli("describe", plain, "-n", "6"), cli("describe", "-", "-n", "6", input=plain.read_bytes())
    assert by_path.exit_code == by_stdin.exit_code == 0 and by_stdin.stdout == by_path.stdout, by_stdin.stderr
    for text, reason in ((b"hello world\n", "not an image"), (b"data:image/png;base64,%%%\n", "invalid base64")):
        result = cli("describe", "-", "-n", "2", input=text)
        assert result.exit_code == 3
        one_error_line(result, "stdin", reason)


def test_phone_photos_heic_and_avif_equal_their_pixels_as_png(cli, images, tmp_path, monkeypatch):
    """A HEIC photo (an iPhone's default) and an AVIF one answer as their decoded pixels given as a PNG do (the HEIC
    decoded by pillow-heif's own API, the reference); `batch` over a folder takes them by default; without
    pillow-heif a HEIC is the one-line error naming what to install."""
    import json
    import sys
    from pathlib import Path

    import pillow_heif

    source = Image.open(images["c"]).convert("RGB")
    folder = tmp_path / "phone"
    folder.mkdir()
    heif = pillow_heif.from_pillow(source)
    heif.save(folder / "a.heic", quality=90)
    source.save(folder / "b.avif", quality=90)
    decoded = {"a.heic": pillow_heif.open_heif(folder / "a.heic").to_pillow().convert("RGB"),
               "b.avif": Image.open(folder / "b.avif").convert("RGB")}
    answers = {}
    for name, pixels in decoded.items():
        pixels.save(tmp_path / f"{name}.png")
        by_png, by_file = (cli("describe", path, "-n", "12") for path in (tmp_path / f"{name}.png", folder / name))
        assert by_file.exit_code == by_png.exit_code == 0, by_file.stderr
        assert by_file.stdout == by_png.stdout
        answers[name] = by_png.stdout.strip()
    batch = cli("batch", folder, "-n", "12")
    assert batch.exit_code == 0, batch.stderr
    records = {Path(r["source"]).name: r for r in map(json.loads, batch.stdout.splitlines())}
    assert {name: r["text"].strip() for name, r in records.items()} == answers
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # not installed
    refused = cli("describe", folder / "a.heic", "-n", "2")
    assert refused.exit_code == 3
    one_error_line(refused, "a.heic", "HEIC/HEIF image", "pip install 'qwen2vl-cli[heif]'")


def test_http_url_equals_the_path(cli, images, reference, http_server):
    http_server.routes["/a.png"] = (200, images["a"].read_bytes(), {"Content-Type": "image/png"})
    result = cli("describe", f"{http_server.url}/a.png", "-n", "12")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == reference


@pytest.fixture
def proxy():
    """A real proxy server (pproxy): SOCKS5 and HTTP on free loopback ports; `proxy.log()` is what it relayed."""
    import os
    import socket
    import subprocess
    import sys
    import time
    from types import SimpleNamespace

    def free_port() -> int:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]

    socks, web = free_port(), free_port()
    process = subprocess.Popen([sys.executable, "-m", "pproxy", "-l", f"socks5://127.0.0.1:{socks}", "-l",
                                f"http://127.0.0.1:{web}", "-v"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"}, text=True)
    lines: list[str] = []
    deadline = time.monotonic() + 30
    while len(lines) < 2 and time.monotonic() < deadline:  # "Serving on ..." once per listener
        lines.append(process.stdout.readline())
    assert all("Serving on" in line for line in lines), lines
    yield SimpleNamespace(socks=f"socks5://127.0.0.1:{socks}", http=f"http://127.0.0.1:{web}",
                          log=lambda: lines.append(process.stdout.readline()) or lines[-1])
    process.terminate()
    process.wait(timeout=10)


@pytest.mark.parametrize("scheme", ["socks", "http"])
def test_an_http_url_is_fetched_through_the_proxy_the_environment_names(cli, images, reference, http_server, proxy,
                                                                       scheme):
    """ALL_PROXY=socks5://... (which needs socksio: it was an 'unexpected ImportError') or HTTP_PROXY: the image
    comes through that proxy, and the answer is the path's."""
    http_server.routes["/a.png"] = (200, images["a"].read_bytes(), {"Content-Type": "image/png"})
    env = {name: "" for base in ("http", "https", "all", "no") for name in (f"{base}_proxy", f"{base.upper()}_PROXY")}
    named = {"socks": ("all_proxy", proxy.socks), "http": ("http_proxy", proxy.http)}[scheme]
    env.update({named[0]: named[1], named[0].upper(): named[1]})  # every other one empty, as if unset
    result = cli("describe", f"{http_server.url}/a.png", "-n", "12", env=env)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == reference
    assert http_server.url.split("//")[1] in proxy.log()  # e.g. "socks5 127.0.0.1:50320 -> 127.0.0.1:41235"


def test_file_url_with_spaces_and_unicode(cli, images, reference, tmp_path):
    target = tmp_path / "my photo é.png"
    target.write_bytes(images["a"].read_bytes())
    result = cli("describe", target.as_uri(), "-n", "12")
    assert result.stdout == reference


def bomb_png(width: int, height: int) -> bytes:
    """A PNG header declaring a huge image: Pillow refuses it at open, before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("case, reason", [
    ("missing", "no such file"),
    ("directory", "is a directory"),
    ("empty", "empty file (0 bytes)"),
    ("text", "not an image"),
    ("truncated", "truncated image"),
    ("bomb", "too large to decode safely"),
    ("aspect", "aspect ratio"),
    ("bad_base64", "invalid base64"),
    ("no_comma", "no ','"),
])
def test_bad_local_inputs_exit_3(cli, tmp_path, images, case, reason):
    path = tmp_path / f"{case}.png"
    if case == "directory":
        path.mkdir()
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "text":
        path.write_text("hello, I am not an image\n")
    elif case == "truncated":
        buffer = io.BytesIO()
        noise_image(200, 150, 9).save(buffer, format="JPEG")
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    elif case == "bomb":
        path.write_bytes(bomb_png(40000, 40000))
    elif case == "aspect":
        noise_image(402, 2, 1).save(path)
    source = {"bad_base64": "data:image/png;base64,@@@not*base64@@@",
              "no_comma": "data:image/png;base64"}.get(case, str(path))
    result = cli("describe", source)
    assert result.exit_code == 3, result.stderr
    one_error_line(result, reason)
    if case not in ("bad_base64", "no_comma"):
        assert str(path) in result.stderr


def test_permission_denied(cli, tmp_path, monkeypatch):
    # root reads anything, so the OS refusal is simulated where the resolver opens files
    import os

    real_open = os.open

    def refuse(path, *args, **kwargs):
        if str(path) == str(target):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    target = tmp_path / "secret.png"
    target.write_bytes(b"x")
    result = cli("describe", target)
    assert result.exit_code == 3
    one_error_line(result, "secret.png", "permission denied")


@pytest.mark.parametrize("source, reason", [
    ("http://127.0.0.1:9/a.png", "cannot connect (Connection refused)"),
    ("ftp://example.com/a.png", "ftp URLs are not read (http, https, file and data are)"),
    ("s3://bucket/a.png", "s3 URLs are not read"),
])
def test_unreachable_and_unread_urls_say_why_in_words(cli, source, reason):
    """A refused connection in the system's words (no "[Errno 111]"); a URL of a scheme nothing reads is said to be
    one, not "no such file"."""
    result = cli("describe", source, "-n", "2")
    assert result.exit_code == 3
    one_error_line(result, source, reason)
    assert "Errno" not in result.stderr


def test_stdin_on_a_terminal_is_an_error_not_a_wait(tiny_model):
    """`describe -` with nothing piped in (stdin a terminal) says so at once (exit 3) rather than waiting for the
    keyboard in silence."""
    import os
    import subprocess
    import sys

    from .conftest import ROOT

    main, terminal = os.openpty()
    try:
        result = subprocess.run([sys.executable, "-m", "qwen2vl_cli", "describe", "-", "-m", str(tiny_model)],
                                stdin=terminal, capture_output=True, timeout=60, cwd=ROOT,
                                env={**os.environ, "QWEN2VL_AUTOSTART": "0"})
    finally:
        os.close(main)
        os.close(terminal)
    assert result.returncode == 3 and result.stderr.count(b"\n") == 1, result.stderr
    assert result.stderr.startswith(b"qwen2vl: error: stdin: is a terminal: pipe the image"), result.stderr


def test_empty_stdin(cli):
    result = cli("describe", "-", input=b"")
    assert result.exit_code == 3
    one_error_line(result, "stdin", "empty")


@pytest.mark.parametrize("route, extra, reason", [
    ("/missing.png", [], "HTTP 404"),
    ("/notimage.png", [], "not an image"),
    ("/big.png", ["--max-download", "1KB"], "too large"),
    ("/slow.png", ["--timeout", "0.5"], "timed out after 0.5s"),
])
def test_bad_urls_exit_3(cli, http_server, images, route, extra, reason):
    http_server.routes["/notimage.png"] = (200, b"<html>nope</html>", {"Content-Type": "text/html"})
    http_server.routes["/big.png"] = (200, b"\0" * 5000, {"Content-Type": "image/png"})
    http_server.routes["/slow.png"] = (200, images["a"].read_bytes(), {})
    url = f"{http_server.url}{route}"
    result = cli("describe", url, *extra)
    assert result.exit_code == 3, result.stderr
    one_error_line(result, url, reason)


def test_unreachable_url_exit_3(cli):
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = cli("describe", f"http://127.0.0.1:{port}/x.png", "--timeout", "2")
    assert result.exit_code == 3
    one_error_line(result, "cannot connect")


def test_exif_orientation_is_respected(tmp_path):
    image = noise_image(80, 40, 5)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    resolved = resolve_image(str(path), ImageOptions(resized_height=None))
    assert resolved.size[1] > resolved.size[0]  # displayed portrait, as a viewer shows it


def test_alpha_goes_onto_white(tmp_path):
    path = tmp_path / "transparent.png"
    Image.new("RGBA", (56, 56), (255, 0, 0, 0)).save(path)
    resolved = resolve_image(str(path))
    assert resolved.mode == "RGB" and resolved.getpixel((10, 10)) == (255, 255, 255)


def test_resolution_options_follow_qwen_vl_utils(images):
    from qwen_vl_utils import smart_resize

    big = resolve_image(str(images["c"]), ImageOptions(min_pixels=256 * 28 * 28))
    assert big.size[0] * big.size[1] >= 256 * 28 * 28 and big.size[0] % 28 == 0
    exact = resolve_image(str(images["c"]), ImageOptions(resized_height=100, resized_width=300))
    assert exact.size == tuple(reversed(smart_resize(100, 300, factor=28)))


@pytest.mark.parametrize("width, height", [(20, 20), (64, 48), (333, 777), (4032, 3024), (1000, 5), (5000, 30)])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_sizing_is_qwen_vl_utils_pixel_for_pixel(width, height, mode):
    """Our torch-free resize (also what the client mode sends) against qwen-vl-utils' fetch_image itself."""
    import numpy as np
    from qwen_vl_utils import fetch_image

    from qwen2vl_cli.errors import InputError
    from qwen2vl_cli.sources import prepare_image

    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    for options in (ImageOptions(), ImageOptions(min_pixels=256 * 784), ImageOptions(max_pixels=64 * 784),
                    ImageOptions(resized_height=100, resized_width=60), ImageOptions(3136, 4 * 3136)):
        try:
            expected = fetch_image({"image": image, **{k: v for k, v in vars(options).items() if v is not None}})
        except ValueError:  # too flat for the bounds: both refuse
            with pytest.raises(InputError):
                prepare_image(image, options, "x")
            continue
        ours = prepare_image(image, options, "x")
        assert ours.size == expected.size and np.array_equal(np.asarray(ours), np.asarray(expected)), options


@pytest.mark.parametrize("text, expected", [("1280*28*28", 1003520), ("1003520", 1003520), ("256 * 28 * 28", 200704)])
def test_pixel_products(text, expected):
    from qwen2vl_cli.cli.options import parse_pixels

    assert parse_pixels(text) == expected


def test_max_pixels_product_reaches_the_model(cli, images):
    import json

    small = json.loads(cli("describe", images["c"], "-n", "2", "--json", "--max-pixels", "4*28*28").stdout)
    large = json.loads(cli("describe", images["c"], "-n", "2", "--json", "--min-pixels", "64*28*28").stdout)
    assert small["usage"]["prompt_tokens"] < large["usage"]["prompt_tokens"]


def test_base64_payloads_wrapped_escaped_unpadded_or_bad():
    """decode_base64 takes what clients send: MIME-wrapped lines, URL-safe and unpadded, percent-escaped (a data
    URI in a URL); anything outside the alphabet is an InputError, never a partial decode."""
    from qwen2vl_cli.errors import InputError
    from qwen2vl_cli.sources import decode_base64

    raw = bytes(range(256)) * 40
    plain = base64.b64encode(raw).decode()
    for form in (plain, plain.rstrip("="), base64.encodebytes(raw).decode(), " " + plain + "\r\n",
                 base64.urlsafe_b64encode(raw).decode().rstrip("="), plain.replace("+", "%2B").replace("/", "%2F")):
        assert decode_base64(form, "x") == raw
    for bad in ("a", "@@@@", "ab=c", plain[:100] + "*" + plain[100:], "===="):
        with pytest.raises(InputError):
            decode_base64(bad, "x")


def test_a_100_megapixel_photo_is_taken_from_the_user_but_not_by_a_server(cli, tmp_path):
    """Above the size Pillow warns at (~89 MP) but under its hard limit (~179 MP): a medium-format camera's photo
    or a scanned panorama, which the seed recipe captions; a server's request stays bounded by the warning."""
    from qwen2vl_cli.errors import InputError
    from qwen2vl_cli.sources import decode_image

    from PIL import Image

    path = tmp_path / "large.png"
    Image.new("RGB", (9500, 9500), (40, 120, 200)).save(path, compress_level=1)  # 90 MP, one colour: a small file
    data = path.read_bytes()
    result = cli("describe", path, "-n", "2", "--max-pixels", "64*28*28")
    assert result.exit_code == 0, result.stderr
    with pytest.raises(InputError, match="too large to decode safely"):
        decode_image(data, "a request's image")
