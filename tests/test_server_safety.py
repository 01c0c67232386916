"""`qwen2vl serve` tried as a hostile or careless client would (issue 14), loopback only: what it fetches,
which requests it answers, its limits, what it does when clients go away, and that it honours or refuses
every OpenAI parameter; and the client's side: it checks the session it finds is the one it recorded."""

from __future__ import annotations

import base64
import http.server
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from .conftest import run_process, start_server, stop

openai = pytest.importorskip("openai")
LONG = "Tell me a long story."  # the tiny model answers this to any length without an end token


@pytest.fixture(scope="module")
def media_site(images):
    """A local web site: /a.png, /redirect -> the loopback address, /drip (a byte every 0.5 s)."""
    payload = images["a"].read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/a.png")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.path == "/drip":
                for byte in payload[:40]:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.5)
            else:
                self.wfile.write(payload)

        def log_message(self, *args):
            pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    yield site.server_port
    site.shutdown()


@pytest.fixture(scope="module")
def guarded(tiny_model, tmp_path_factory):
    """A server with the defaults (no fetching) and small limits where a test needs them."""
    state = tmp_path_factory.mktemp("state")
    process, url = start_server(tiny_model, state, "--keep-alive", "never", "--max-images", "2",
                                "--max-prompt-tokens", "2000", "--max-queue", "2")
    yield {"url": url, "state": state, "process": process}
    stop(process)


def data_uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def chat(url: str, model, content, timeout: float = 60, **fields) -> httpx.Response:
    body = {"model": str(model), "max_tokens": 6, "messages": [{"role": "user", "content": content}], **fields}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=timeout)


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def in_process(cli, *args) -> str:
    result = cli(*args, "--no-server")
    assert result.exit_code == 0, result.stderr
    return result.stdout[:-1]


# ---- what the server fetches -------------------------------------------------------------------------

def test_no_url_is_fetched_by_default(guarded, tiny_model, media_site):
    response = chat(guarded["url"], tiny_model, [image_part(f"http://127.0.0.1:{media_site}/a.png"), "Hi"])
    assert response.status_code == 403 and "only allowed public URLs" in response.json()["error"]["message"]


def test_allow_fetch_refuses_loopback_whatever_the_spelling_and_closed_ports_look_the_same(tiny_model, tmp_path,
                                                                                            media_site):
    process, url = start_server(tiny_model, tmp_path, "--allow-fetch", "--keep-alive", "never")
    try:
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]
        closed.close()
        targets = [f"http://127.0.0.1:{media_site}/a.png", f"http://localhost:{media_site}/a.png",
                   f"http://0.0.0.0:{media_site}/a.png", f"http://2130706433:{media_site}/a.png",
                   f"http://[::ffff:127.0.0.1]:{media_site}/a.png", f"http://127.0.0.1:{closed_port}/a.png",
                   "http://169.254.169.254/latest/meta-data/"]
        texts = set()
        for target in targets:
            response = chat(url, tiny_model, [image_part(target), {"type": "text", "text": "Hi"}])
            assert response.status_code == 403, (target, response.text)
            texts.add(response.json()["error"]["message"].split(": ", 1)[1])
        assert len(texts) == 1  # open port, closed port, metadata service: one text
    finally:
        stop(process)


def test_allowed_domains_are_fetched_and_their_redirects_checked(tiny_model, tmp_path, media_site, images, cli):
    process, url = start_server(tiny_model, tmp_path, "--allowed-media-domains", "localhost", "--keep-alive", "never")
    try:
        expected = in_process(cli, "describe", images["a"], "-p", "Hi", "-n", "6")
        fetched = chat(url, tiny_model, [image_part(f"http://localhost:{media_site}/a.png"),
                                         {"type": "text", "text": "Hi"}])
        assert fetched.status_code == 200, fetched.text
        assert fetched.json()["choices"][0]["message"]["content"] == expected
        redirected = chat(url, tiny_model, [image_part(f"http://localhost:{media_site}/redirect"),
                                            {"type": "text", "text": "Hi"}])
        assert redirected.status_code == 403  # to 127.0.0.1: not a named host
        other = chat(url, tiny_model, [image_part(f"http://127.0.0.1:{media_site}/a.png"),
                                       {"type": "text", "text": "Hi"}])
        assert other.status_code == 403
        # a dripping download is bounded by --timeout as a whole
        process2, url2 = start_server(tiny_model, tmp_path / "2", "--allowed-media-domains", "localhost",
                                      "--timeout", "3", "--keep-alive", "never")
        try:
            started = time.monotonic()
            dripped = chat(url2, tiny_model, [image_part(f"http://localhost:{media_site}/drip"),
                                              {"type": "text", "text": "Hi"}])
            assert dripped.status_code == 400 and "timed out" in dripped.text
            assert time.monotonic() - started < 10
        finally:
            stop(process2)
    finally:
        stop(process)


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("127.0.0.1", False), ("10.1.2.3", False),
    ("192.168.0.1", False), ("172.16.5.4", False), ("169.254.169.254", False), ("100.64.0.1", False),
    ("0.0.0.0", False), ("::1", False), ("::ffff:127.0.0.1", False), ("fe80::1%eth0", False), ("fd00::1", False),
    ("224.0.0.1", False), ("not an address", False),
])
def test_public_addresses(address, public):
    from qwen2vl_cli.sources import is_public_address

    assert is_public_address(address) is public


# ---- which requests it answers -----------------------------------------------------------------------

@pytest.mark.parametrize("case, status", [
    ("text_plain", 415), ("form", 415), ("no_content_type", 415), ("foreign_host", 421), ("rebound_host", 421),
])
def test_only_json_for_this_host(guarded, tiny_model, case, status):
    body = json.dumps({"model": str(tiny_model), "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    port = guarded["url"].rsplit(":", 1)[1]
    headers = {"text_plain": {"Content-Type": "text/plain"},
               "form": {"Content-Type": "application/x-www-form-urlencoded"},
               "no_content_type": {},
               "foreign_host": {"Content-Type": "application/json", "Host": "evil.example"},
               "rebound_host": {"Content-Type": "application/json", "Host": f"rebind.example:{port}"}}[case]
    response = httpx.post(guarded["url"] + "/v1/chat/completions", content=body, headers=headers, timeout=30)
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]
    ok = httpx.post(guarded["url"] + "/v1/chat/completions", content=body, timeout=60,
                    headers={"Content-Type": "application/json; charset=utf-8", "Host": f"localhost:{port}"})
    assert ok.status_code == 200, ok.text


# ---- limits ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, words", [
    ("prompt_over_limit", "--max-prompt-tokens"), ("megabytes_of_text", "--max-prompt-tokens"),
    ("too_many_images", "--max-images"), ("min_pixels_over_limit", "min_pixels"),
    ("resized_over_limit", "resized_height"), ("frames_over_limit", "nframes"), ("over_the_context", "context"),
])
def test_limits_are_400_at_once(guarded, tiny_model, images, case, words):
    text = {"type": "text", "text": "Hi"}
    image = image_part(data_uri(images["a"]))
    cases = {
        "prompt_over_limit": ([{"type": "text", "text": "word " * 3000}], {}),
        "megabytes_of_text": ([{"type": "text", "text": "x" * (2 * 1024 * 1024)}], {}),
        "too_many_images": ([image, image, image, text], {}),
        "min_pixels_over_limit": ([image, text], {"mm_processor_kwargs": {"min_pixels": 16384 * 784}}),
        "resized_over_limit": ([image, text], {"mm_processor_kwargs": {"resized_height": 10000,
                                                                      "resized_width": 10000}}),
        "frames_over_limit": ([image, text], {"mm_processor_kwargs": {"nframes": 100000}}),
        "over_the_context": ([image, text], {"max_tokens": 32760}),
    }
    content, fields = cases[case]
    started = time.monotonic()
    response = chat(guarded["url"], tiny_model, content, **fields)
    assert response.status_code == 400, response.text
    assert words in response.json()["error"]["message"]
    assert time.monotonic() - started < 10


def test_a_full_queue_answers_429_with_retry_after(guarded, tiny_model):
    body = {"model": str(tiny_model), "max_tokens": 20000, "stream": True,
            "messages": [{"role": "user", "content": LONG}]}
    hold = [httpx.stream("POST", guarded["url"] + "/v1/chat/completions", json=body, timeout=120) for _ in range(2)]
    try:
        for request in hold:
            response = request.__enter__()
            assert response.status_code == 200
        refused = chat(guarded["url"], tiny_model, "Hi")
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        deadline = time.monotonic() + 10  # /health tells the truth: one generating, one waiting
        while (health := httpx.get(guarded["url"] + "/health", timeout=5).json())["running"] != 1:
            assert time.monotonic() < deadline, health
            time.sleep(0.1)
        assert health["busy"] and health["queued"] == 1 and health["idle_s"] == 0
    finally:
        for request in hold:
            request.__exit__(None, None, None)
    deadline = time.monotonic() + 30  # both hung up: the worker is free again
    while httpx.get(guarded["url"] + "/health", timeout=5).json()["busy"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert chat(guarded["url"], tiny_model, "Hi").status_code == 200


def test_a_non_streamed_request_stops_when_its_client_goes(guarded, tiny_model):
    with pytest.raises(httpx.ReadTimeout):
        chat(guarded["url"], tiny_model, LONG, timeout=2, max_tokens=20000)
    deadline = time.monotonic() + 15  # 20000 tokens would take minutes
    while httpx.get(guarded["url"] + "/health", timeout=5).json()["busy"]:
        assert time.monotonic() < deadline, "still generating for a client that has gone"
        time.sleep(0.2)


# ---- OpenAI parameters: honoured or refused ----------------------------------------------------------

@pytest.mark.parametrize("fields, param", [
    ({"logprobs": True}, "logprobs"), ({"top_logprobs": 3, "logprobs": True}, "logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"), ({"logit_bias": {"100": 5}}, "logit_bias"),
    ({"n": 0}, "n"), ({"n": 17}, "n"), ({"n": "2"}, "n"), ({"n": 3}, "n"),  # 3: over this server's queue of 2
    ({"best_of": 3}, "best_of"), ({"stop": [""]}, "stop"), ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"chat_template_kwargs": {"enable_thinking": True}}, "chat_template_kwargs"),
])
def test_parameters_it_cannot_honour_are_refused(guarded, tiny_model, fields, param):
    response = chat(guarded["url"], tiny_model, "Hi", **fields)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_stop_strings_are_honoured_plain_streamed_and_batched(guarded, tiny_model, cli):
    full = in_process(cli, "ask", "-q", LONG, "-n", "40")
    stop_at = full[len(full) // 2:len(full) // 2 + 3]
    expected = full[:full.index(stop_at)]
    # this server's queue holds 2: the client retries a 429 after its Retry-After, as the real client does
    client = openai.OpenAI(base_url=guarded["url"] + "/v1", api_key="x", max_retries=8, timeout=60)
    messages = [{"role": "user", "content": LONG}]
    plain = client.chat.completions.create(model=str(tiny_model), messages=messages, max_tokens=40, stop=stop_at)
    assert plain.choices[0].message.content == expected and plain.choices[0].finish_reason == "stop"
    assert plain.usage.completion_tokens < 40
    chunks = client.chat.completions.create(model=str(tiny_model), messages=messages, max_tokens=40,
                                            stop=["never appears", stop_at], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    with ThreadPoolExecutor(4) as pool:  # batched together, each with its own stop strings
        stops = [stop_at, None, stop_at, "never appears"]
        answers = list(pool.map(lambda s: client.chat.completions.create(
            model=str(tiny_model), messages=messages, max_tokens=40, stop=s).choices[0].message.content, stops))
    assert answers == [expected, full, expected, full]


def test_frequency_and_presence_penalties_follow_openai(guarded, tiny_model):
    """Against a greedy loop written here from OpenAI's definition: logits minus frequency x count minus
    presence x (count > 0), counts over the tokens generated so far."""
    import torch
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_model)
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": [{"type": "text", "text": LONG}]}]
    ids = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    client = openai.OpenAI(base_url=guarded["url"] + "/v1", api_key="x", max_retries=0, timeout=60)
    for frequency, presence in ((1.5, 0.0), (0.0, 2.0), (0.7, 0.9)):
        generated: list[int] = []
        with torch.no_grad():
            for _ in range(24):
                logits = model(input_ids=torch.tensor([ids[0].tolist() + generated])).logits[0, -1]
                counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=logits.shape[0]).float() \
                    if generated else torch.zeros_like(logits)
                logits = logits - frequency * counts - presence * (counts > 0).float()
                token = int(logits.argmax())
                generated.append(token)
                if token in (151645, 151643):
                    break
        expected = processor.tokenizer.decode(generated, skip_special_tokens=True)
        reply = client.chat.completions.create(model=str(tiny_model), messages=[{"role": "user", "content": LONG}],
                                               max_tokens=24, frequency_penalty=frequency, presence_penalty=presence)
        assert reply.choices[0].message.content == expected, (frequency, presence)


def test_vision_ids_as_chat_template_kwargs(guarded, tiny_model, images, cli):
    expected = in_process(cli, "describe", images["a"], images["b"], "-p", "Compare.", "-n", "8", "--vision-ids")
    content = [image_part(data_uri(images["a"])), image_part(data_uri(images["b"])), {"type": "text", "text": "Compare."}]
    response = chat(guarded["url"], tiny_model, content, max_tokens=8, chat_template_kwargs={"add_vision_id": True})
    assert response.json()["choices"][0]["message"]["content"] == expected
    plain = chat(guarded["url"], tiny_model, content, max_tokens=8)
    assert plain.json()["choices"][0]["message"]["content"] != expected


# ---- errors name what the client sent ----------------------------------------------------------------

def test_errors_do_not_reveal_server_paths(tiny_model, tmp_path, images):
    media = tmp_path / "media"
    (media / "private-store").mkdir(parents=True)
    (media / "private-store" / "secret-name.png").write_bytes(b"not an image")
    (media / "shown.png").symlink_to(media / "private-store" / "secret-name.png")
    process, url = start_server(tiny_model, tmp_path / "state", "--allowed-local-media-path", media,
                                "--keep-alive", "never")
    try:
        response = chat(url, tiny_model, [image_part(str(media / "shown.png")), {"type": "text", "text": "Hi"}])
        assert response.status_code == 400
        message = response.json()["error"]["message"]
        assert "secret-name" not in message and "private-store" not in message and "not an image" in message
    finally:
        stop(process)


# ---- the session a client finds is the one it recorded -----------------------------------------------

def test_an_impostor_on_a_recorded_port_is_not_trusted_nor_killed(tiny_model, tmp_path, images):
    """A record whose process is alive but whose port now answers as someone else: commands answer
    in-process, `stop` leaves the process alone and drops the record."""
    class Impostor(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"status": "ok", "model": str(tiny_model), "loaded": True, "pid": bystander.pid}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            self.send_response(500)
            self.end_headers()

        def log_message(self, *args):
            pass

    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Impostor)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    try:
        (tmp_path / f"{bystander.pid}.json").write_text(json.dumps({
            "pid": bystander.pid, "url": f"http://127.0.0.1:{site.server_port}", "model": str(tiny_model),
            "token": "recorded-secret", "device": "cpu", "started": time.time()}))
        env = {"QWEN2VL_STATE_DIR": str(tmp_path), "QWEN2VL_MODEL": str(tiny_model)}
        answered = run_process("describe", images["a"], "-n", "4", env=env)
        assert answered.returncode == 0, answered.stderr.decode()  # in-process, not the impostor's 500
        stopped = run_process("stop", env=env)
        assert stopped.returncode == 0 and bystander.poll() is None
        assert not (tmp_path / f"{bystander.pid}.json").exists()
    finally:
        site.shutdown()
        bystander.kill()


def test_sigint_removes_the_state_file(tiny_model, tmp_path):
    process, url = start_server(tiny_model, tmp_path)
    assert list(tmp_path.glob(f"{process.pid}.json"))
    process.send_signal(signal.SIGINT)
    process.wait(timeout=30)
    assert not list(tmp_path.glob("*.json"))


# ---- the client sends media at their final size ------------------------------------------------------

@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from .test_video import make_video

    return make_video(tmp_path_factory.mktemp("clip") / "clip.mp4", frames=30, fps=10, width=112, height=84)


@pytest.mark.parametrize("args", [
    ("describe", "{a}", "-n", "8", "--max-pixels", "4*28*28"),
    ("describe", "{b}", "-n", "8", "--resized-height", "56", "--resized-width", "112"),
    ("describe", "{a}", "{b}", "-n", "8", "--vision-ids", "-p", "Compare."),
    ("video", "{clip}", "-q", "What happens?", "-n", "8"),
    ("video", "{clip}", "-q", "What happens?", "-n", "8", "--nframes", "4", "--resized-height", "56",
     "--resized-width", "84"),
    ("video", "{frames}", "-q", "What happens?", "-n", "8"),
    ("ask", "{a}", "--video", "{clip}", "-q", "Compare.", "-n", "8", "--min-pixels", "16*28*28"),
    ("describe", "{jpg}", "{rotated}", "-n", "8"),
    ("describe", "{rotated}", "-n", "8", "--max-pixels", "12*28*28"),
    ("describe", "{rotated}", "-n", "8", "--resized-height", "140", "--resized-width", "56"),
], ids=["max-pixels", "resized", "vision-ids", "video", "video-resized", "frame-dir", "image+video",
        "own-bytes", "own-bytes-max-pixels", "own-bytes-resized"])
def test_client_answers_equal_in_process(guarded, tiny_model, images, clip, tmp_path_factory, cli, args):
    """Media are sized in the client by the in-process code and sent as they are (photos as their own bytes
    with that size, resized by the server with the same code: EXIF orientation included): every option holds
    through a server, with no mm_processor_kwargs (frame directories included, once in-process only)."""
    from .conftest import noise_image

    frames = tmp_path_factory.mktemp("frames")
    for i in range(1, 5):
        noise_image(84, 56, 60 + i).save(frames / f"f{i}.png")
    args = [a.format(a=images["a"], b=images["b"], clip=clip, frames=frames, jpg=images["jpg"],
                     rotated=rotated_photo(frames.parent)) for a in args]
    expected = in_process(cli, *args)
    remote = run_process(*args, "--server", guarded["url"], env={"QWEN2VL_MODEL": str(tiny_model)})
    assert remote.returncode == 0, remote.stderr.decode()
    assert remote.stdout.decode()[:-1] == expected
    assert b"note" not in remote.stderr  # a qwen2vl server takes every size as sent


def rotated_photo(folder: Path) -> Path:
    """A smooth JPEG (a photo's few bytes per pixel) that its EXIF says to show turned 90 degrees."""
    from PIL import Image

    path = folder / "rotated.jpg"
    if not path.exists():
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.linear_gradient("L").resize((140, 84)).convert("RGB").save(path, quality=90, exif=exif)
    return path


def test_what_the_client_sends_a_qwen2vl_server(images, tmp_path):
    """A photo goes as its own bytes (JPEG's few bytes per pixel) with the size the model sees it at; an image
    whose pixels are fewer bytes (noise as PNG), one much larger than the model sees it (the server would decode
    it all again), one whose size that cannot say (under 4 tokens), or one in a form or mode outside
    OWN_BYTES_FORMATS/MODES (TIFF, 16-bit PNG), as its sized pixels; any other server gets the sized pixels as PNG."""
    from PIL import Image

    from qwen2vl_cli.client import RemoteSession
    from qwen2vl_cli.sources import ImageOptions, read_image
    from qwen2vl_cli.types import ChatRequest

    ours = RemoteSession("http://127.0.0.1:9", "m", kind="qwen2vl")
    photo = read_image(str(rotated_photo(tmp_path)))
    assert photo.size == (84, 140)  # upright
    part = ours.body(ChatRequest("Hi", [ours.image_media(photo)]), False)["messages"][0]["content"][0]
    assert part["image_url"] == {"url": "data:image/jpeg;base64," + base64.b64encode(photo.data).decode(),
                                 "resized_width": 84, "resized_height": 140}
    assert ours.image_media(read_image(str(images["a"]))).data.startswith("data:image/bmp;")
    tiff, deep = tmp_path / "photo.tiff", tmp_path / "deep.png"  # another Pillow may not decode these alike
    Image.open(rotated_photo(tmp_path)).save(tiff, compression="tiff_lzw")  # libtiff's codecs
    Image.open(rotated_photo(tmp_path)).convert("L").convert("I;16").save(deep)  # 16-bit pixels
    for path in (tiff, deep):
        assert ours.image_media(read_image(str(path))).data.startswith("data:image/bmp;"), path
    for options in (ImageOptions(min_pixels=28 * 28, max_pixels=3 * 28 * 28), ImageOptions(max_pixels=8 * 28 * 28)):
        assert ours.image_media(read_image(photo.name, options)).data.startswith("data:image/bmp;")
    other = RemoteSession("http://127.0.0.1:9", "m", kind="openai")
    assert other.image_media(photo).data.startswith("data:image/png;") and other.image_media(photo).metadata is None


@pytest.mark.parametrize("mode,form", [("CMYK", "JPEG"), ("RGB", "MPO"), ("LA", "PNG"), ("P", "GIF"), ("RGB", "WEBP"),
                                       ("RGBA", "WEBP")])
def test_a_server_makes_of_an_images_bytes_the_pixels_the_client_would(tmp_path, mode, form):
    """Whatever form a photo sent as bytes comes in (CMYK, alpha, palette, MPO), what the server makes of its bytes
    and the size sent beside them is, pixel for pixel, what the client would have sent (or answered with in
    process)."""
    import numpy as np
    from PIL import Image

    from qwen2vl_cli.client import RemoteSession
    from qwen2vl_cli.server.protocol import MediaPolicy, media_options, resolve_part_media
    from qwen2vl_cli.sources import FetchLimits, ImageOptions, read_image

    gradient = Image.linear_gradient("L").resize((300, 200))
    picture = Image.merge("RGBA", (gradient, gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
                                   gradient.transpose(Image.Transpose.FLIP_TOP_BOTTOM), gradient.rotate(30)))
    path = tmp_path / f"picture.{form.lower()}"
    made = picture.convert("L").convert(mode) if mode == "LA" else picture.convert(mode)
    made.save(path, form, **({"save_all": True, "append_images": [made.rotate(90)]} if form == "MPO" else {}))
    ours, policy = RemoteSession("http://127.0.0.1:9", "m", kind="qwen2vl"), MediaPolicy(FetchLimits(), as_sent=True)
    image = read_image(str(path), ImageOptions(max_pixels=60 * 28 * 28))
    media = ours.image_media(image)
    assert media.metadata, "sent as its own bytes"
    served = resolve_part_media("image", media.data, media_options(media.metadata, policy)[0], None, policy)
    assert served.data.size == image.size and served.data.mode == "RGB"
    assert np.array_equal(np.asarray(served.data), np.asarray(image.sized()))


def test_only_a_server_that_says_it_resizes_is_sent_an_images_bytes(guarded, tiny_model, tmp_path):
    """A qwen2vl server from before 0.2 would size a photo's bytes by its defaults (it knows no resized_height
    beside the url): its /health's version decides, and one that gives none is sent pixels."""
    from qwen2vl_cli.client import RemoteSession
    from qwen2vl_cli.sources import read_image

    photo = read_image(str(rotated_photo(tmp_path)))
    assert RemoteSession(guarded["url"], str(tiny_model)).image_media(photo).data.startswith("data:image/jpeg;")

    for version in ("0.1.0", None):
        class Health(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = json.dumps({"status": "ok", "pid": 1, **({"version": version} if version else {})}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        old = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
        threading.Thread(target=old.serve_forever, daemon=True).start()
        try:
            session = RemoteSession(f"http://127.0.0.1:{old.server_port}", "m").load()
            assert session.kind == "qwen2vl" and not session.own_bytes
            assert session.image_media(photo).data.startswith("data:image/bmp;")
        finally:
            old.shutdown()


def test_an_images_own_sizing_is_checked_as_the_requests(guarded, tiny_model, images):
    """resized_height/width beside an image_url's url (what the client sends with a photo's bytes) are bounded
    as mm_processor_kwargs are: over the prompt limit, given by half, or a min above the max, a 400 naming the
    part's keys, and the server keeps serving."""
    part = {"type": "image_url", "image_url": {"url": data_uri(images["a"]), "resized_height": 28 * 60,
                                               "resized_width": 28 * 60}}
    refused = chat(guarded["url"], tiny_model, [part, {"type": "text", "text": "Hi"}])
    assert refused.status_code == 400, refused.text
    assert "messages[0].content[0].image_url.resized_height x resized_width" in refused.json()["error"]["message"]
    where = "messages[0].content[0].image_url."
    for sizing, said in (({"resized_height": 56}, f"{where}resized_height and {where}resized_width: give both"),
                         ({"resized_height": 0, "resized_width": 28}, f"{where}resized_height must be between 1"),
                         ({"min_pixels": 10000, "max_pixels": 5000}, f"{where}min_pixels 10000 is larger than "
                                                                     f"{where}max_pixels 5000")):
        refused = chat(guarded["url"], tiny_model, [{"type": "image_url", "image_url": {"url": data_uri(images["a"]),
                                                                                        **sizing}},
                                                          {"type": "text", "text": "Hi"}])
        assert refused.status_code == 400 and said in refused.json()["error"]["message"], refused.text
    part["image_url"].update(resized_height=56, resized_width=28)  # on the grid but 2 tokens: sized up to 4
    answered = chat(guarded["url"], tiny_model, [part, {"type": "text", "text": "Hi"}])
    assert answered.status_code == 200, answered.text


def test_the_client_sends_no_processor_kwargs(tiny_model, images):
    from qwen2vl_cli.client import RemoteSession
    from qwen2vl_cli.types import ChatRequest, GenerationOptions
    from qwen2vl_cli.sources import ImageOptions, read_image

    session = RemoteSession("http://127.0.0.1:9", str(tiny_model))
    session.kind = "openai"
    media = session.image_media(read_image(str(images["a"]), ImageOptions(resized_height=56, resized_width=56)))
    body = session.body(ChatRequest("Hi", [media], vision_ids=True,
                                    generation=GenerationOptions(8, stop=("x",), frequency_penalty=0.5)), False)
    assert "mm_processor_kwargs" not in body and "add_vision_id" not in body
    assert body["chat_template_kwargs"] == {"add_vision_id": True}
    assert body["stop"] == ["x"] and body["frequency_penalty"] == 0.5
    from PIL import Image
    import io

    sent = Image.open(io.BytesIO(base64.b64decode(media.data.split(",", 1)[1])))
    assert sent.format == "PNG" and sent.size == (56, 56)


def test_a_servers_refusal_is_exit_6_with_its_message(guarded, tiny_model, images):
    refused = run_process("describe", images["a"], images["a"], images["a"], "--server", guarded["url"],
                          env={"QWEN2VL_MODEL": str(tiny_model)})
    assert refused.returncode == 6
    assert refused.stderr.decode().strip().endswith("3 images in one request, over this server's limit of 2 (--max-images)")
