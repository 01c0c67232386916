"""Every README example and seed conversation form through the commands in-process, bf16 (the default on
CUDA): each answers, with the documented exit code, no traceback, and nothing on stdout but the answer."""

from __future__ import annotations

import json

import pytest


def _ok(result, what: str) -> str:
    assert result.exit_code == 0, f"{what}: exit {result.exit_code}: {result.stderr}"
    assert "Traceback" not in result.stderr and "unexpected" not in result.stderr, result.stderr
    assert result.stdout.strip(), f"{what}: no answer"
    return result.stdout


@pytest.mark.parametrize("name, args", [
    ("describe", ("describe", "{photo}")),
    ("describe two images", ("describe", "{photo}", "{tall}", "-p", "Which is sharper?")),
    ("ask", ("ask", "{wide}", "-q", "What is the peak value?")),
    ("vision ids", ("ask", "{photo}", "{tall}", "-q", "Compare them.", "--vision-ids")),
    ("text only", ("ask", "-q", "Write a haiku about GPUs.")),
    ("system message", ("ask", "{photo}", "-q", "What is it?", "--system", "You are a terse art critic.")),
    ("no stream", ("describe", "{photo}", "--no-stream")),
    ("video", ("video", "{clip}")),
    ("video window", ("video", "{clip}", "-q", "When does it change?", "--fps", "1", "--start", "1", "--end", "3", "-v")),
    ("frame directory", ("video", "{frames}", "--nframes", "4")),
    ("frame glob", ("video", "{frames}/frame*.png")),
    ("image and video", ("ask", "{photo}", "--video", "{clip}", "-q", "Is this photo from the video?", "--vision-ids")),
    ("tiny image", ("describe", "{tiny}")),
    ("huge image", ("describe", "{huge}")),
    ("sampling", ("describe", "{photo}", "-t", "0.7", "--top-p", "0.9", "--seed", "3")),
    ("repetition penalty", ("describe", "{photo}", "--repetition-penalty", "1.2")),
])
def test_readme_examples_answer(gpu_cli, media, name, args):
    argv = [a.format(**media) for a in args]
    text = _ok(gpu_cli(*argv, "-n", "24"), name)
    as_json = gpu_cli(*argv, "-n", "24", "--json")
    record = json.loads(_ok(as_json, name + " --json"))  # stdout is the JSON and nothing else
    assert record["text"] and record["usage"]["completion_tokens"] > 0
    if "-t" not in argv:  # greedy: the same answer streamed and as JSON
        assert text == record["text"] + "\n"  # (an answer may itself end in a newline: rstrip would eat it)


def test_stdin_and_data_uri_equal_the_path(gpu_cli, media):
    import base64

    path = _ok(gpu_cli("describe", media["photo"], "-n", "16"), "path")
    raw = media["photo"].read_bytes()
    assert _ok(gpu_cli("describe", "-", "-n", "16", input=raw), "stdin") == path
    uri = "data:image/jpeg;base64," + base64.b64encode(raw).decode()
    assert _ok(gpu_cli("describe", uri, "-n", "16"), "data URI") == path


def test_sampling_is_reproducible_with_a_seed(gpu_cli, media):
    args = ("describe", media["photo"], "-n", "24", "-t", "0.8", "--seed", "7")
    assert _ok(gpu_cli(*args), "sampled") == _ok(gpu_cli(*args), "sampled again")


def test_graphs_do_not_change_the_answer(gpu_cli, media):
    """bf16, one session: the first answer runs without graphs, the second captures them, the third replays."""
    answers = [_ok(gpu_cli("describe", media["wide"], "-n", "48"), "describe") for _ in range(3)]
    assert answers[0] == answers[1] == answers[2]
    texts = [_ok(gpu_cli("ask", "-q", "Write a haiku about GPUs.", "-n", "48"), "text only") for _ in range(3)]
    assert texts[0] == texts[1] == texts[2]


def test_an_idle_server_engine_captures_what_came_once(gpu_cli, media, tmp_path, checkpoint):
    """A server's engine, idle after a shape's first request, captures that shape's prompt graphs: the second
    request (the next one-liner through a session) replays them without a capture on its path, same answer."""
    import time

    from PIL import Image

    from qwen2vl_cli.engine.session import _SESSIONS

    from .conftest import DRY

    if DRY:
        pytest.skip("CUDA graphs: none on the CPU")
    Image.open(media["wide"]).resize((1120, 840)).save(tmp_path / "new-size.jpg")  # a shape no other test has
    first = _ok(gpu_cli("describe", tmp_path / "new-size.jpg", "-n", "32"), "first")
    session = next(s for s in _SESSIONS.values() if s.spec.model == str(checkpoint) and s.spec.dtype == "auto"
                   and s.spec.attn == "auto" and s.fast is not None)
    engine, prefill = session.engine, session.fast.prefill
    kinds = {key[0] for key in prefill.pending}
    assert kinds == {"vision", "text"}, prefill.pending  # seen once: none captured on the first request's path
    engine.serving = True
    try:
        assert _ok(gpu_cli("ask", "-q", "Nothing to capture?", "-n", "4"), "wakes the engine")  # text only
        deadline = time.monotonic() + 60
        while prefill.pending and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not prefill.pending
        captures = []
        original = prefill._capture
        prefill._capture = lambda key, make: captures.append(key) or original(key, make)
        try:
            assert _ok(gpu_cli("describe", tmp_path / "new-size.jpg", "-n", "32"), "second") == first
        finally:
            del prefill._capture
        assert captures == []  # both graphs (vision tower, language model) were there already
    finally:
        engine.serving = False


@pytest.mark.parametrize("setting", [("--dtype", "float16"), ("--attn", "eager"), ("QWEN2VL_FASTPATH", "off")])
def test_other_settings_answer(gpu_cli, media, setting):
    name, value = setting
    env = {name: value} if name.isupper() else None
    args = () if env else setting
    for argv in (("describe", media["photo"]), ("ask", "-q", "Write a haiku about GPUs."),
                 ("ask", media["photo"], "--video", media["frames"], "-q", "Same place?")):
        _ok(gpu_cli(*argv, *args, "-n", "16", env=env), f"{setting} {argv[0]}")


def test_twenty_minute_video_at_the_defaults(gpu_cli, media, measured):
    result = gpu_cli("video", media["long"], "-n", "16", "--json")
    record = json.loads(_ok(result, "20-minute video"))
    facts = record["videos"][0]
    measured("video_tokens", facts["tokens"])
    measured("prompt_tokens", record["usage"]["prompt_tokens"])
    assert facts["duration_s"] == 1200 and facts["tokens"] <= 24576


def test_batch_of_mixed_sizes_with_a_bad_file(gpu_cli, media, tmp_path, measured):
    names = ["photo", "tall", "tiny", "wide", "huge", "corrupt"]
    out = tmp_path / "captions.jsonl"
    result = gpu_cli("batch", *(media[n] for n in names), "-o", out, "-n", "24")
    assert result.exit_code == 5, result.stderr  # finished, one item failed
    records = {r["source"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert len(records) == len(names)
    assert records[str(media["corrupt"])]["error"] and not records[str(media["corrupt"])]["text"]
    good = [records[str(media[n])] for n in names[:-1]]
    assert all(r["error"] is None and r["text"] for r in good)
    alone = _ok(gpu_cli("describe", media["tall"], "-n", "24", "-p", "Describe this image."), "alone")
    measured("batch_equals_alone_tall", records[str(media["tall"])]["text"] + "\n" == alone)
    rerun = gpu_cli("batch", *(media[n] for n in names), "-o", out, "-n", "24")
    assert rerun.exit_code in (0, 5) and len(out.read_text().splitlines()) == len(names)  # resumed, no duplicates



def test_batch_of_clips_and_photos(gpu_cli, media, tmp_path, measured):
    """Videos share the engine's batch with photos (the rows' own rope positions, a video's prefill through the
    model's forward): every item answered, a broken clip one failed record, each clip's caption measured against
    `qwen2vl video` alone."""
    from ..test_video import make_video

    other = make_video(tmp_path / "other.MOV", frames=24, fps=8, width=240, height=320, seed=3)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(media["clip"].read_bytes()[:300])
    sources = [media["clip"], other, media["long"], media["photo"], media["tall"], broken]
    result = gpu_cli("batch", *sources, "-n", "24", "--max-frames", "16")
    assert result.exit_code == 5, result.stderr
    records = {r["source"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert len(records) == len(sources) and records[str(broken)]["error"] and not records[str(broken)]["text"]
    assert all(records[str(s)]["error"] is None and records[str(s)]["text"] for s in sources[:-1])
    for name, source in (("clip", media["clip"]), ("other", other)):
        alone = _ok(gpu_cli("video", source, "-n", "24", "--max-frames", "16"), name)
        measured(f"batch_equals_video_{name}", records[str(source)]["text"] + "\n" == alone)


def test_batch_captures_graphs_while_the_next_batch_is_prepared(gpu_cli, tmp_path):
    """Batches of 1280x960 photos: the first batch captures a decode graph while the producer thread copies
    the next batch's images to the GPU. A capture must not fail (it did with transformers 5.24, whose image
    processor copies to the GPU itself) and must not turn the fused kernels or graphs off."""
    from ..conftest import noise_image

    folder = tmp_path / "many"
    folder.mkdir()
    for index in range(160):  # the benchmark's photos; the default batch size (64 on an H100)
        noise_image(80, 60, 300 + index).resize((1280, 960)).save(folder / f"{index:03d}.jpg", quality=90)
    result = gpu_cli("batch", folder, "-n", "16", "--max-pixels", str(1280 * 28 * 28))
    assert result.exit_code == 0, result.stderr
    assert "unavailable" not in result.stderr, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 160 and all(r["error"] is None and r["text"] for r in records)
