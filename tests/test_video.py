"""`qwen2vl video` and `ask --video`: sampling equals qwen-vl-utils', answers equal the seed recipe's."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from qwen2vl_cli.video import VideoOptions, resolve_video

from .conftest import noise_image
from .test_sources import one_error_line


def make_video(path, frames=40, fps=10, width=96, height=64, seed=0, codec="libx264", noise=True):
    """Encode a small video with PyAV: random noise, or (fast to encode) one flat colour per frame."""
    import av

    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            pixels = (rng.integers(0, 256, (height, width, 3), dtype=np.uint8) if noise
                      else np.full((height, width, 3), rng.integers(0, 256, 3), dtype=np.uint8))
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_audio_only(path):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for i in range(10):
            samples = (np.sin(np.arange(1024) / 10.0) * 0.3).astype(np.float32)[None, :]
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_video(tmp_path_factory.mktemp("video") / "clip.mp4")


@pytest.fixture(scope="module")
def frame_dir(tmp_path_factory):
    """frame1.png ... frame12.png: natural order puts frame10 after frame9."""
    folder = tmp_path_factory.mktemp("frames")
    for i in range(1, 13):
        noise_image(84, 56, 100 + i).save(folder / f"frame{i}.png")
    return folder


@pytest.fixture(scope="module")
def seed_video_recipe(tiny_model):
    """The seed recipe for videos: process_vision_info, then the processor with a scalar fps (FACTS)."""
    from qwen_vl_utils import process_vision_info
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_model)
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model)

    def answer(video_element: dict, question: str, max_new_tokens: int = 12) -> str:
        messages = [{"role": "user", "content": [{"type": "video", **video_element}, {"type": "text", "text": question}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        images, videos, kwargs = process_vision_info(messages, return_video_kwargs=True)
        inputs = processor(text=[text], images=images, videos=videos, padding=True, return_tensors="pt",
                           do_sample_frames=False, fps=kwargs["fps"][0])
        out = model.generate(**inputs, max_new_tokens=max_new_tokens)
        return processor.batch_decode(out[:, inputs.input_ids.shape[1]:], skip_special_tokens=True,
                                      clean_up_tokenization_spaces=False)[0]

    return answer


@pytest.mark.parametrize("element, options", [
    ({}, VideoOptions()),
    ({"fps": 1.0}, VideoOptions(fps=1.0)),
    ({"fps": 4.0, "max_frames": 6}, VideoOptions(fps=4.0, max_frames=6)),
    ({"fps": 0.5, "min_frames": 8}, VideoOptions(fps=0.5, min_frames=8)),
    ({"nframes": 6}, VideoOptions(nframes=6)),
    ({"nframes": 7}, VideoOptions(nframes=7)),
    ({"video_start": 1.0, "video_end": 3.0}, VideoOptions(start=1.0, end=3.0)),
    ({"video_start": 0.55, "nframes": 4}, VideoOptions(start=0.55, nframes=4)),
    ({"video_end": 2.0, "fps": 3.0}, VideoOptions(end=2.0, fps=3.0)),
])
@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_sampling_equals_qwen_vl_utils(clip, element, options, backend):
    from dataclasses import replace

    from qwen_vl_utils import process_vision_info

    messages = [{"role": "user", "content": [{"type": "video", "video": str(clip), **element}]}]
    _, videos, _ = process_vision_info(messages, return_video_kwargs=True, return_video_metadata=True)
    expected, metadata = videos[0]
    ours = resolve_video(str(clip), replace(options, backend=backend))
    assert ours.metadata.frames_indices == [int(i) for i in metadata["frames_indices"]]
    assert ours.frames.shape == expected.shape
    assert bool((ours.frames == expected).all()), "same frames, same resize as qwen-vl-utils"


def test_video_answer_equals_seed_recipe(cli, clip, seed_video_recipe):
    expected = seed_video_recipe({"video": str(clip), "fps": 1.0}, "What happened in the video?")
    result = cli("video", clip, "-q", "What happened in the video?", "--fps", "1", "-n", "12")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_frame_directory_and_glob_equal_seed_frame_list(cli, frame_dir, seed_video_recipe):
    ordered = [f"file://{frame_dir}/frame{i}.png" for i in range(1, 13)]  # natural order
    expected = seed_video_recipe({"video": ordered}, "Describe this video.")
    by_dir = cli("video", frame_dir, "-n", "12")
    by_glob = cli("video", f"{frame_dir}/frame*.png", "-n", "12")
    assert by_dir.exit_code == 0, by_dir.stderr
    assert by_dir.stdout == by_glob.stdout == expected + "\n"
    shuffled = [ordered[i] for i in (0, 1, 9, 10, 11, 2, 3, 4, 5, 6, 7, 8)]  # plain string sort
    assert seed_video_recipe({"video": shuffled}, "Describe this video.") != expected


def test_pyav_fallback_when_decord_fails(cli, clip, monkeypatch):
    reference = cli("video", clip, "-n", "10", "--video-backend", "decord")

    def broken(ele):
        raise RuntimeError("decord exploded")

    monkeypatch.setattr("qwen_vl_utils.vision_process._read_video_decord", broken)
    fallback = cli("video", clip, "-n", "10")
    assert fallback.exit_code == 0, fallback.stderr
    assert fallback.stdout == reference.stdout
    assert "fell back to pyav (decord: decord exploded)" in fallback.stderr
    explicit = cli("video", clip, "-n", "10", "--video-backend", "pyav")
    assert explicit.stdout == reference.stdout


def test_verbose_and_json_report_sampling(cli, clip):
    result = cli("video", clip, "-n", "4", "--fps", "1", "--verbose", "--json")
    record = json.loads(result.stdout)
    facts = record["videos"][0]
    assert facts["frames"] == 4 and facts["video_frames"] == 40 and facts["duration_s"] == 4.0
    assert facts["tokens"] == 4 // 2 * (facts["width"] // 28) * (facts["height"] // 28)
    assert record["usage"]["prompt_tokens"] > facts["tokens"]
    assert "sampled 4 frames at 1 fps" in result.stderr and f"{facts['tokens']} video tokens" in result.stderr


def test_ask_mixes_images_and_videos(cli, clip, images):
    result = cli("ask", images["a"], "--video", clip, "-q", "Compare.", "-n", "6", "--json", "--nframes", "4")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["sources"] == [str(images["a"]), str(clip)] and len(record["videos"]) == 1


def test_long_video_is_bounded_and_says_so(tmp_path):
    long_clip = make_video(tmp_path / "long.mp4", frames=1200, fps=1, width=640, height=480, noise=False)  # 20 min
    video = resolve_video(str(long_clip))
    assert video.facts["frames"] == 256 and video.facts["tokens"] <= 24576
    assert any("sampled 256 frames instead of 1200 (--max-frames 256)" in n for n in video.notes), video.notes
    assert any("frames reduced to" in n and "--total-pixels" in n for n in video.notes), video.notes
    small = resolve_video(str(long_clip), VideoOptions(total_pixels=8192 * 28 * 28, max_frames=64))
    assert small.facts["frames"] == 64 and small.facts["tokens"] <= 8192


@pytest.mark.parametrize("case, args, reason", [
    ("text", [], "not a readable video"),
    ("audio", [], "no video stream (audio only)"),
    ("truncated", [], "not a readable video"),
    ("empty", [], "empty file (0 bytes)"),
    ("missing", [], "no such file"),
    ("clip", ["--start", "10"], "past the end of the video (4.00s)"),
    ("clip", ["--start", "3", "--end", "2"], "is not before --end"),
    ("clip", ["--end", "9"], "past the end"),
    ("clip", ["--nframes", "100"], "not enough frames: 100 asked for"),
    ("one_frame", [], "not enough frames: 1 to sample from"),
    ("empty_dir", [], "holds no frame images"),
    ("bad_frames", [], "not an image"),
    ("no_match", [], "no files match"),
])
def test_bad_videos_exit_3(cli, clip, tmp_path, case, args, reason):
    target = tmp_path / f"{case}.mp4"
    if case == "text":
        target.write_text("not a video at all\n" * 20)
    elif case == "audio":
        target = make_audio_only(tmp_path / "audio.m4a")
    elif case == "truncated":
        data = clip.read_bytes()
        target.write_bytes(data[: len(data) // 3])
    elif case == "empty":
        target.write_bytes(b"")
    elif case == "one_frame":
        make_video(target, frames=1, noise=False)
    elif case == "clip":
        target = clip
    elif case == "empty_dir":
        target = tmp_path / "empty_dir"
        target.mkdir()
    elif case == "bad_frames":
        target = tmp_path / "bad_frames"
        target.mkdir()
        noise_image(56, 56, 1).save(target / "f1.png")
        (target / "f2.png").write_text("garbage")
    elif case == "no_match":
        target = tmp_path / "nothing*.png"
    result = cli("video", target, *args)
    assert result.exit_code == 3, result.stderr
    one_error_line(result, reason)
    assert "Errno" not in result.stderr and str(tmp_path) not in result.stderr.split(": ", 3)[-1], result.stderr


def test_fps_and_nframes_together_is_a_usage_error(cli, clip):
    result = cli("video", clip, "--fps", "1", "--nframes", "4")
    assert result.exit_code == 2
    one_error_line(result, "--fps/--nframes")


@pytest.mark.skipif(shutil.which("true") is None, reason="needs a POSIX shell")
def test_video_over_http(cli, clip, http_server):
    http_server.routes["/clip.mp4"] = (200, clip.read_bytes(), {"Content-Type": "video/mp4"})
    local = cli("video", clip, "-n", "6")
    remote = cli("video", f"{http_server.url}/clip.mp4", "-n", "6")
    assert remote.exit_code == 0, remote.stderr
    assert remote.stdout == local.stdout


def test_video_from_stdin_and_as_a_data_uri(cli, clip):
    """`-` reads the video from stdin (its bytes, or their base64), and a data URI carries it: the same answer as
    its path; stdin that is no video is the one-line error naming stdin (exit 3)."""
    import base64

    local = cli("video", clip, "-n", "6")
    payload = base64.b64encode(clip.read_bytes()).decode()
    for args, given in ((["-"], clip.read_bytes()), (["-"], payload.encode()),
                        ([f"data:video/mp4;base64,{payload}"], None)):
        result = cli("video", *args, "-n", "6", input=given)
        assert result.exit_code == 0, result.stderr
        assert result.stdout == local.stdout
    asked = cli("ask", "-q", "Describe this video.", "--video", "-", "-n", "6", input=clip.read_bytes())
    assert asked.exit_code == 0 and asked.stdout == local.stdout, asked.stderr
    refused = cli("video", "-", "-n", "2", input=clip.read_bytes()[:300])
    assert refused.exit_code == 3 and refused.stderr.startswith("qwen2vl: error: stdin: "), refused.stderr
