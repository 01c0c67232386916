"""`qwen2vl batch`: every item gets one record, batching does not change answers, nothing is lost."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT, noise_image, stop_text_in
from .test_video import make_audio_only, make_video


@pytest.fixture
def tree(tmp_path, images):
    """Nested folders with good images of several sizes, a corrupt file, a zero-byte file, odd names, hidden
    entries."""
    root = tmp_path / "photos"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.png").write_bytes(images["a"].read_bytes())
    (root / "sub" / "b with space é.png").write_bytes(images["b"].read_bytes())
    (root / "sub" / "deeper" / "c\nnewline.png").write_bytes(images["c"].read_bytes())
    (root / "sub" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (root / "zero.png").write_bytes(b"")
    (root / "notes.md").write_text("not an image extension: ignored")
    (root / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble metadata")  # hidden: passed over
    (root / ".thumbnails").mkdir()
    (root / ".thumbnails" / "a.png").write_bytes(images["a"].read_bytes())
    os.symlink(root, root / "sub" / "loop")
    return root


def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def alone(cli, path, *extra) -> str:
    result = cli("describe", path, "-n", "8", *extra)
    assert result.exit_code == 0, result.stderr
    return result.stdout[:-1]


def test_folder_run_records_every_item_and_equals_describe(cli, tree):
    result = cli("batch", tree, "-r", "-n", "8", "-b", "4")
    assert result.exit_code == 5, result.stderr  # finished, some items failed
    by_source = {r["source"]: r for r in records(result.stdout)}
    good = [tree / "a.png", tree / "sub" / "b with space é.png", tree / "sub" / "deeper" / "c\nnewline.png"]
    bad = {tree / "sub" / "corrupt.jpg": "truncated image", tree / "zero.png": "empty file"}
    assert set(by_source) == {str(p) for p in [*good, *bad]}
    for path in good:  # three sizes in one batch: batching must not change the answer
        assert by_source[str(path)]["error"] is None
        assert by_source[str(path)]["text"] == alone(cli, path)
    for path, reason in bad.items():
        assert by_source[str(path)]["text"] is None and reason in by_source[str(path)]["error"]
    assert "symlink loop" in result.stderr
    assert "3 done, 0 skipped (already done), 2 failed" in result.stderr


def test_the_summary_counts_the_answers_cut_at_max_new_tokens(cli, tree):
    """Each record says how its answer ended (finish_reason, as `describe --json` does: "length" at -n, "stop" at a
    stop string) and the summary on stderr how many reached -n; none is said when every answer ended on its own."""
    paths = [tree / "a.png", tree / "sub" / "b with space é.png"]
    alone = [json.loads(cli("describe", p, "-n", "8", "--json").stdout) for p in paths]
    cut = sum(a["finish_reason"] == "length" for a in alone)
    assert cut, "the answers should reach -n: the test can fail"
    result = cli("batch", *paths, "-n", "8")
    assert result.exit_code == 0, result.stderr
    assert f"images/s; {cut} cut off at --max-new-tokens (-n)" in result.stderr
    assert [r["finish_reason"] for r in records(result.stdout)] == [a["finish_reason"] for a in alone]
    where, stop = stop_text_in(alone[0]["text"])
    ended = cli("batch", paths[0], "-n", "8", "--stop", stop)
    assert ended.exit_code == 0 and records(ended.stdout)[0]["text"] == alone[0]["text"][:where]
    assert records(ended.stdout)[0]["finish_reason"] == "stop"
    assert "cut off" not in ended.stderr


def test_without_recursion_only_the_top_folder(cli, tree):
    result = cli("batch", tree, "-n", "4")
    assert {r["source"] for r in records(result.stdout)} == {str(tree / "a.png"), str(tree / "zero.png")}


def test_stdin_list_and_ext_filter(cli, tree):
    listing = f"{tree / 'a.png'}\n{tree / 'sub' / 'b with space é.png'}\n\n"
    result = cli("batch", "-", "-n", "4", input=listing)
    assert result.exit_code == 0, result.stderr
    assert [r["source"] for r in records(result.stdout)] == [str(tree / "a.png"), str(tree / "sub" / "b with space é.png")]
    only_jpg = cli("batch", tree, "-r", "--ext", "jpg", "-n", "4")
    assert [r["source"] for r in records(only_jpg.stdout)] == [str(tree / "sub" / "corrupt.jpg")]


def test_manifest_with_prompts_and_extra_fields(cli, tree, tmp_path):
    manifest = tmp_path / "todo.jsonl"
    manifest.write_text(
        json.dumps({"source": str(tree / "a.png"), "id": 7, "split": "train"}) + "\n"
        + json.dumps({"source": str(tree / "sub" / "b with space é.png"), "prompt": "What colour dominates?", "id": 8}) + "\n")
    result = cli("batch", "--manifest", manifest, "-n", "8")
    assert result.exit_code == 0, result.stderr
    first, second = records(result.stdout)
    assert first["id"] == 7 and first["split"] == "train" and first["text"] == alone(cli, tree / "a.png")
    assert second["id"] == 8 and second["text"] == alone(cli, tree / "sub" / "b with space é.png", "-p", "What colour dominates?")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "x.png"}\n{"id": 3}\n')
    refused = cli("batch", "--manifest", bad)
    assert refused.exit_code == 3 and "bad.jsonl line 2" in refused.stderr
    for field in ("text", "error", "finish_reason"):  # the record's own: copied through, they would replace it
        bad.write_text(json.dumps({"source": str(tree / "a.png"), field: "stop"}) + "\n")
        refused = cli("batch", "--manifest", bad)
        assert refused.exit_code == 3 and f"field {field!r} is the result's own" in refused.stderr, refused.stderr


def test_sidecars_are_written_kept_and_overwritten(cli, tree):
    result = cli("batch", tree, "-r", "-n", "8", "--sidecar", "--prefix", "photo of ", "--suffix", "\n")
    assert result.exit_code == 5 and result.stdout == ""
    sidecar = tree / "a.txt"
    assert sidecar.read_text() == "photo of " + alone(cli, tree / "a.png") + "\n"
    assert not (tree / "zero.txt").exists() and not list(tree.rglob(".*qwen2vl-tmp"))
    sidecar.write_text("hand-written caption")
    cli("batch", tree / "a.png", "-n", "8", "--sidecar")
    assert sidecar.read_text() == "hand-written caption"  # kept
    cli("batch", tree / "a.png", "-n", "8", "--sidecar", "--overwrite", "--sidecar-ext", "txt")
    assert sidecar.read_text() == alone(cli, tree / "a.png")
    spaced = tree / "sub" / "b with space é.png"  # named by a file:// URL, escapes and all: beside that file
    for url in (spaced.as_uri(), "file://localhost" + spaced.as_uri()[len("file://"):]):
        spaced.with_suffix(".txt").unlink(missing_ok=True)
        assert cli("batch", url, "-n", "8", "--sidecar").exit_code == 0
        assert spaced.with_suffix(".txt").read_text() == alone(cli, spaced)


@pytest.fixture(scope="module")
def clips(tmp_path_factory, images):
    """A folder as a phone leaves it: two clips of different sizes and lengths (one named in capitals), a photo,
    a clip that is not one, a clip with no picture, a note."""
    root = tmp_path_factory.mktemp("clips")
    make_video(root / "walk.mp4", frames=20, fps=10, width=96, height=64)
    make_video(root / "PARK.MOV", frames=30, fps=10, width=64, height=96, seed=1)
    (root / "photo.png").write_bytes(images["a"].read_bytes())
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video at all")
    make_audio_only(root / "voice.m4v")
    (root / "notes.md").write_text("not a picture")
    return root


def test_videos_are_captioned_as_the_video_command_captions_them(cli, clips):
    """A folder's clips are videos (by their extension, any case), each answered with "Describe this video." as
    `qwen2vl video` answers it alone, with the same sampling options, whatever shares the engine's batch; a clip
    that cannot be read is one failed record and the run goes on."""
    result = cli("batch", clips, "-n", "8", "-b", "4", "--nframes", "4")
    assert result.exit_code == 5, result.stderr
    by_source = {Path(r["source"]).name: r for r in records(result.stdout)}
    assert set(by_source) == {"walk.mp4", "PARK.MOV", "photo.png", "broken.mp4", "voice.m4v"}
    for name in ("walk.mp4", "PARK.MOV"):
        video = cli("video", clips / name, "-n", "8", "--nframes", "4")
        assert video.exit_code == 0, video.stderr
        assert by_source[name]["text"] == video.stdout[:-1] and by_source[name]["error"] is None
    assert by_source["photo.png"]["text"] == alone(cli, clips / "photo.png")
    assert "not a readable video" in by_source["broken.mp4"]["error"]
    assert "no video stream" in by_source["voice.m4v"]["error"]
    assert "3 done, 0 skipped (already done), 2 failed" in result.stderr and " items/s" in result.stderr
    sampled = cli("batch", clips / "walk.mp4", "-n", "8", "--fps", "5", "--max-frames", "6", "-p", "What moves?")
    video = cli("video", clips / "walk.mp4", "-n", "8", "--fps", "5", "--max-frames", "6", "-q", "What moves?")
    assert records(sampled.stdout)[0]["text"] == video.stdout[:-1] and " videos/s" in sampled.stderr
    photos = cli("batch", clips, "-n", "8", "--ext", "png,jpg")  # --ext still picks what counts
    assert [Path(r["source"]).name for r in records(photos.stdout)] == ["photo.png"]
    assert " images/s" in photos.stderr


def test_a_video_run_resumes_and_takes_per_clip_prompts(cli, clips, tmp_path):
    manifest = tmp_path / "clips.jsonl"
    manifest.write_text(json.dumps({"source": str(clips / "walk.mp4"), "prompt": "Who walks?", "id": 1}) + "\n"
                        + json.dumps({"source": str(clips / "PARK.MOV"), "id": 2}) + "\n")
    out = tmp_path / "out.jsonl"
    first = cli("batch", "--manifest", manifest, "-n", "8", "--nframes", "4", "-o", out)
    assert first.exit_code == 0, first.stderr
    by_id = {r["id"]: r for r in records(out.read_text())}
    assert by_id[1]["text"] == cli("video", clips / "walk.mp4", "-n", "8", "--nframes", "4", "-q", "Who walks?").stdout[:-1]
    assert by_id[2]["text"] == cli("video", clips / "PARK.MOV", "-n", "8", "--nframes", "4").stdout[:-1]
    written = out.read_text()
    again = cli("batch", "--manifest", manifest, "-n", "8", "--nframes", "4", "-o", out)
    assert again.exit_code == 0 and "0 done, 2 skipped (already done)" in again.stderr
    assert out.read_text() == written


def test_video_options_that_cannot_work_stop_the_run_before_it_starts(cli, clips):
    both = cli("batch", clips / "walk.mp4", "--fps", "1", "--nframes", "4")
    assert both.exit_code == 2 and "--fps/--nframes" in both.stderr and both.stdout == ""
    missing = cli("batch", clips / "walk.mp4", "--video-backend", "torchcodec")
    if importlib.util.find_spec("torchcodec") is None:
        assert missing.exit_code == 2 and "torchcodec is not installed" in missing.stderr and missing.stdout == ""
    late = cli("batch", clips / "walk.mp4", "-n", "4", "--start", "60")  # the clip's own fault: its record
    assert late.exit_code == 5 and "past the end of the video" in records(late.stdout)[0]["error"]


def test_files_that_would_share_a_sidecar_each_keep_their_caption(cli, clips, tmp_path, monkeypatch):
    """A phone's live photo is IMG_1.jpg and IMG_1.mov: both captions are kept, each sidecar named after its whole
    file name, the same on a resume; a file with no twin keeps photo.txt."""
    folder = tmp_path / "live"
    folder.mkdir()
    (folder / "IMG_1.png").write_bytes((clips / "photo.png").read_bytes())
    (folder / "IMG_1.mov").write_bytes((clips / "walk.mp4").read_bytes())
    (folder / "IMG_2.png").write_bytes((clips / "photo.png").read_bytes())
    result = cli("batch", folder, "-n", "8", "--nframes", "4", "--sidecar")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in folder.glob("*.txt")) == ["IMG_1.mov.txt", "IMG_1.png.txt", "IMG_2.txt"]
    assert "2 files would share a sidecar" in result.stderr
    assert (folder / "IMG_1.png.txt").read_text() == alone(cli, folder / "IMG_1.png")
    assert (folder / "IMG_1.mov.txt").read_text() == cli("video", folder / "IMG_1.mov", "-n", "8", "--nframes", "4").stdout[:-1]
    monkeypatch.chdir(tmp_path)  # the same files however they are named
    again = cli("batch", folder / "IMG_1.png", "./live/IMG_1.mov", "-n", "8", "--nframes", "4", "--sidecar")
    assert again.exit_code == 0 and "0 done, 2 skipped (already done)" in again.stderr, again.stderr


def test_which_sources_are_videos():
    from qwen2vl_cli.video import is_video_file

    videos = ["clip.mp4", "a/b/IMG_0001.MOV", "file:///x/y.webm", "https://host/v.mkv?sig=1#t=3", "x.m4v",
              "data:video/mp4;base64,AAAA", "DATA:VIDEO/webm;base64,AAAA"]
    others = ["photo.jpg", "https://host/watch?v=clip.mp4", "https://host/mp4", "data:image/png;base64,AAAA", "-", "",
              "clip.mp4.txt", "mp4"]
    assert [s for s in videos if not is_video_file(s)] == []
    assert [s for s in others if is_video_file(s)] == []


def test_a_folder_of_clips_holds_few_decoded_at_once():
    """Videos count by their tokens against what is kept in flight, and a window of decoding ends at a few of
    them: a folder of clips holds about as many frames in memory as a folder of photos."""
    from qwen2vl_cli.batch.inputs import BatchItem
    from qwen2vl_cli.batch.runner import PHOTO_TOKENS, WINDOW_ITEMS, WINDOW_VIDEOS, _windows, weight
    from qwen2vl_cli.types import ChatRequest, Media

    items = [BatchItem(f"{i}.jpg") for i in range(100)] + [BatchItem(f"{i}.mp4") for i in range(20)]
    windows = list(_windows(items))
    assert [len(w) for w in windows] == [WINDOW_ITEMS, 36 + WINDOW_VIDEOS, WINDOW_VIDEOS, 20 - 2 * WINDOW_VIDEOS]
    assert [item for window in windows for item in window] == items
    assert [len(w) for w in _windows(items[100:], 3)] == [3] * 6 + [2]  # no more than the workers decoding them
    photo = Media("image", "a.jpg", None, facts={"tokens": 16000})
    clip = Media("video", "b.mp4", None, facts={"tokens": 10 * PHOTO_TOKENS + 1})
    assert weight(ChatRequest("", [photo])) == 1 and weight(ChatRequest("", [clip])) == 11


def test_with_sidecars_alone_an_answer_with_no_file_beside_goes_to_stdout(cli, tree, images, http_server):
    """A URL's caption has no file to sit beside: its record is printed, not dropped."""
    http_server.routes["/remote.png"] = (200, images["b"].read_bytes(), {"Content-Type": "image/png"})
    url = f"{http_server.url}/remote.png"
    result = cli("batch", url, tree / "a.png", "-n", "8", "--sidecar")
    assert result.exit_code == 0, result.stderr
    assert records(result.stdout) == [{"source": url, "text": alone(cli, url), "error": None, "finish_reason": "length"}]
    assert (tree / "a.txt").read_text() == alone(cli, tree / "a.png")


def test_sidecars_never_replace_an_image(cli, tree, images):
    """--sidecar-ext with an image's extension was taken: photo.png "already done" as its own sidecar, and with
    --overwrite each PNG replaced by its caption. It is a usage error now, as is one that names no file or leaves
    the folder; an image named with the sidecars' extension (shot.txt) keeps its bytes, its record goes to stdout."""
    before = (tree / "a.png").read_bytes()
    for extension, said in (("png", "--sidecar-ext png: is an image extension: the captions would replace the images"),
                            (".JPG", "--sidecar-ext .JPG: is an image extension"),
                            ("../up", "--sidecar-ext '../up': give an extension such as txt or caption"),
                            ("", "--sidecar-ext '': give an extension such as txt or caption")):
        result = cli("batch", tree, "-n", "4", "--sidecar", "--overwrite", "--sidecar-ext", extension)
        assert result.exit_code == 2 and said in result.stderr, result.stderr
    assert (tree / "a.png").read_bytes() == before and not (tree / "a.txt").exists()
    named = tree / "shot.txt"
    named.write_bytes(images["b"].read_bytes())
    result = cli("batch", named, tree / "a.png", "-n", "8", "--sidecar", "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert named.read_bytes() == images["b"].read_bytes()
    assert records(result.stdout) == [{"source": str(named), "text": alone(cli, named), "error": None,
                                       "finish_reason": "length"}]
    assert (tree / "a.txt").read_text() == alone(cli, tree / "a.png")


def test_written_files_get_the_umask_not_private_modes(cli, tree, tmp_path):
    """Sidecars were 0600 (their temporary file's mode), as was a results file once --retry-errors rewrote it:
    unreadable to a group sharing a dataset. A new file gets the umask's mode, a rewritten one keeps its own."""
    mask = os.umask(0o022)
    os.umask(mask)
    assert cli("batch", tree / "a.png", "-n", "4", "--sidecar").exit_code == 0
    assert (tree / "a.txt").stat().st_mode & 0o777 == 0o666 & ~mask
    out = tmp_path / "captions.jsonl"
    cli("batch", tree / "a.png", tree / "zero.png", "-n", "4", "-o", out)
    out.chmod(0o664)
    cli("batch", tree / "a.png", tree / "zero.png", "-n", "4", "-o", out, "--retry-errors")
    assert out.stat().st_mode & 0o777 == 0o664 and len(out.read_text().splitlines()) == 2


def test_a_manifest_prompt_that_is_not_unicode_is_one_line(cli, tree, tmp_path):
    """A manifest's prompt of bytes in another encoding, or JSON's unpaired surrogate escape, was an unexpected error
    per item (the tokenizer's TypeError); it is the manifest's input error, exit 3, naming the line."""
    for line in (b'{"source": "a.png", "prompt": "caf\xe9"}', b'{"source": "a.png", "prompt": "a\\ud800"}'):
        manifest = tmp_path / "todo.jsonl"
        manifest.write_bytes(line + b"\n")
        result = cli("batch", "--manifest", manifest, "-n", "4")
        assert result.exit_code == 3, result.stderr
        assert result.stderr.strip() == f"qwen2vl: error: {manifest} line 1: 'prompt' is not valid UTF-8 text"


def test_a_sidecar_that_cannot_be_written_fails_its_item_not_the_run(cli, tree, tmp_path):
    """A sidecar's place taken by a folder ended the run (an unexpected IsADirectoryError, exit 1; and counted the
    item done on the next run). Now that item fails, named, the others are captioned (exit 5); a results file keeps
    its caption with the error, and --retry-errors writes the sidecar once its place is free."""
    (tree / "a.txt").mkdir()
    alone_run = cli("batch", tree / "a.png", tree / "sub" / "b with space é.png", "-n", "8", "--sidecar")
    assert alone_run.exit_code == 5, alone_run.stderr
    assert f"failed: {tree / 'a.png'}: cannot write its sidecar {tree / 'a.txt'} (Is a directory)" in alone_run.stderr
    assert (tree / "sub" / "b with space é.txt").is_file()
    out = tmp_path / "captions.jsonl"
    kept = cli("batch", tree / "a.png", "-n", "8", "--sidecar", "-o", out)
    assert kept.exit_code == 5
    assert records(out.read_text()) == [{"source": str(tree / "a.png"), "text": alone(cli, tree / "a.png"),
                                         "error": f"cannot write its sidecar {tree / 'a.txt'} (Is a directory)",
                                         "finish_reason": "length"}]
    (tree / "a.txt").rmdir()
    assert cli("batch", tree / "a.png", "-n", "8", "--sidecar", "-o", out, "--retry-errors").exit_code == 0
    assert (tree / "a.txt").read_text() == alone(cli, tree / "a.png")
    assert records(out.read_text())[0]["error"] is None


def test_a_file_that_holds_no_results_is_never_written_to(cli, tree, tmp_path):
    """-o naming a file of something else (a dataset's CSV with no newline at its end, a JSONL of other records, the
    manifest itself) was appended to: the CSV got rows of empty cells and no captions, its last line cut as "torn";
    the manifest's lines, having a source, made every item "already done". Now a usage error, the file untouched."""
    table = tmp_path / "prices.csv"
    table.write_bytes(b"name,price\nfoo,1\nbar,2")
    other = tmp_path / "notes.jsonl"
    other.write_bytes(b'{"a": 1}\n{"source": "x.png", "label": "cat"}\n')
    manifest = tmp_path / "todo.jsonl"
    manifest.write_text(json.dumps({"source": str(tree / "a.png"), "prompt": "Hi"}) + "\n")
    for path, extra in ((table, ()), (other, ()), (manifest, ("--manifest", manifest))):
        before = path.read_bytes()
        result = cli("batch", *(() if extra else (tree / "a.png",)), *extra, "-n", "4", "-o", path)
        assert result.exit_code == 2, result.stderr
        assert "holds something other than qwen2vl's results (source, text, error)" in result.stderr
        assert path.read_bytes() == before and not list(tmp_path.glob(".*qwen2vl-lock"))
    torn = tmp_path / "torn.jsonl"  # a first record a killed run left half-written is ours: repaired, resumed
    torn.write_bytes(b'{"source": "' + str(tree / "a.png").encode() + b'", "te')
    assert cli("batch", tree / "a.png", "-n", "4", "-o", torn).exit_code == 0
    assert [r["source"] for r in records(torn.read_text())] == [str(tree / "a.png")]


def test_output_file_resumes_without_duplicates(cli, tree, tmp_path):
    out = tmp_path / "captions.jsonl"
    first = cli("batch", tree / "a.png", tree / "zero.png", "-n", "4", "-o", out)
    assert first.exit_code == 5
    with open(out, "a") as handle:  # a run killed mid-write leaves a torn record
        handle.write('{"source": "/half/written.png", "te')
    second = cli("batch", tree, "-r", "-n", "4", "-o", out)
    assert "repaired a torn last record" in second.stderr
    assert "1 skipped (already done)" in second.stderr and "1 failed in an earlier run" in second.stderr
    assert second.exit_code == 5  # the earlier failure is still on record
    lines = out.read_text().splitlines()
    sources = [json.loads(line)["source"] for line in lines]  # every line is valid JSON
    assert len(sources) == len(set(sources)) == 5
    (tree / "zero.png").write_bytes((tree / "a.png").read_bytes())  # the user fixes the broken file
    third = cli("batch", tree, "-r", "-n", "4", "-o", out, "--retry-errors")
    final = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(final) == 5 and {r["source"] for r in final} == set(sources)
    assert next(r for r in final if r["source"] == str(tree / "zero.png"))["error"] is None
    assert third.exit_code == 5  # corrupt.jpg still fails
    redo = cli("batch", tree / "a.png", "-n", "4", "-o", out, "--overwrite")
    assert redo.exit_code == 0 and len(out.read_text().splitlines()) == 1


def test_csv_output_and_resume(cli, tree, tmp_path):
    out = tmp_path / "captions.csv"
    cli("batch", tree / "a.png", tree / "zero.png", "-n", "4", "-o", out)
    with open(out, "a", newline="") as handle:
        handle.write('/torn.png,"half a cap')  # torn inside a quoted field
    cli("batch", tree, "-r", "-n", "4", "-o", out)
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["source"] for r in rows].count(str(tree / "a.png")) == 1 and len(rows) == 5
    assert list(rows[0]) == ["source", "text", "error", "finish_reason"]
    newline_row = next(r for r in rows if "newline" in r["source"])
    assert newline_row["source"] == str(tree / "sub" / "deeper" / "c\nnewline.png")


def test_results_written_before_finish_reason_are_resumed_as_they_are(cli, tree, tmp_path):
    """A .csv or .jsonl written before records had finish_reason is ours: its items are skipped, a CSV keeps its
    columns (the new rows without that one), a JSON Lines file gets the field in the new records only."""
    done = str(tree / "a.png")
    old_csv, old_jsonl = tmp_path / "old.csv", tmp_path / "old.jsonl"
    old_csv.write_text(f"source,text,error\n{done},an old caption,\n")
    old_jsonl.write_text(json.dumps({"source": done, "text": "an old caption", "error": None}) + "\n")
    for out in (old_csv, old_jsonl):
        result = cli("batch", done, tree / "sub" / "b with space é.png", "-n", "4", "-o", out)
        assert result.exit_code == 0 and "1 done, 1 skipped" in result.stderr, result.stderr
    with open(old_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["source", "text", "error"] and rows[0]["text"] == "an old caption" and len(rows) == 2
    lines = records(old_jsonl.read_text())
    assert "finish_reason" not in lines[0] and lines[1]["finish_reason"] == "length" and len(lines) == 2


def test_a_resumed_csv_says_which_fields_it_has_no_column_for(cli, tree, tmp_path):
    """A CSV keeps the columns it was started with; a later manifest's new field was dropped without a word."""
    out = tmp_path / "captions.csv"
    assert cli("batch", tree / "a.png", "-n", "4", "-o", out).exit_code == 0
    manifest = tmp_path / "todo.jsonl"
    manifest.write_text(json.dumps({"source": str(tree / "sub" / "b with space é.png"), "label": "b"}) + "\n")
    result = cli("batch", "--manifest", manifest, "-n", "4", "-o", out)
    assert result.exit_code == 0
    assert f"{out} has no column for label: those fields are not written" in result.stderr
    with open(out, newline="") as handle:
        assert [row["source"] for row in csv.DictReader(handle)] == [str(tree / "a.png"),
                                                                     str(tree / "sub" / "b with space é.png")]


def test_a_file_name_that_is_not_utf8_is_kept_exactly(cli, images, tmp_path, tiny_model):
    """Such a name (Latin-1 bytes, as old archives have) is written to JSON as its escape and to CSV as its bytes,
    read back to the same file on resume, and taken from a stdin list under a strict UTF-8 locale."""
    folder = tmp_path / "latin1"
    folder.mkdir()
    named = os.fsdecode(bytes(folder) + b"/caf\xe9.png")  # what os.listdir gives: a lone surrogate for \xe9
    with open(named, "wb") as handle:
        handle.write(images["a"].read_bytes())
    for out in (tmp_path / "out.jsonl", tmp_path / "out.csv"):
        first, again = (cli("batch", folder, "-n", "2", "-o", out) for _ in range(2))
        assert first.exit_code == again.exit_code == 0, first.stderr
        assert "0 done, 1 skipped (already done)" in again.stderr  # read back as the same file
    (record,) = records(tmp_path.joinpath("out.jsonl").read_bytes().decode("utf-8"))  # valid UTF-8 JSON
    assert record["source"] == named and record["text"]
    assert os.fsencode(named) in tmp_path.joinpath("out.csv").read_bytes()  # the name's own bytes
    described = cli("describe", named, "-n", "2", "--json")
    assert json.loads(described.stdout)["sources"] == [named]
    # a real process whose streams are strict UTF-8 (as under en_US.UTF-8): the list's bytes in, valid JSON out
    piped = subprocess.run([sys.executable, "-m", "qwen2vl_cli", "batch", "-", "-n", "2", "--model", str(tiny_model)],
                           input=os.fsencode(named) + b"\n", capture_output=True, timeout=300, cwd=ROOT,
                           env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    assert piped.returncode == 0, piped.stderr.decode()
    assert records(piped.stdout.decode("utf-8"))[0]["source"] == named


def test_all_good_exits_0(cli, tree):
    result = cli("batch", tree / "a.png", "-n", "4")
    assert result.exit_code == 0 and len(records(result.stdout)) == 1


def test_verbose_says_which_weights_answer(cli, tree):
    result = cli("batch", tree / "a.png", "-n", "4", "--verbose")
    assert result.exit_code == 0, result.stderr
    assert "float32 weights on cpu; fast path off (CPU); loaded in" in result.stderr
    assert "weights on" not in cli("batch", tree / "a.png", "-n", "4").stderr


def test_nothing_to_do_is_a_usage_error(cli):
    result = cli("batch")
    assert result.exit_code == 2


def _many_images(folder, count):
    folder.mkdir()
    for i in range(count):
        noise_image(56 + 28 * (i % 3), 56, 1000 + i).save(folder / f"img{i:03d}.png")
    return sorted(folder.iterdir())


def _start_batch(tiny_model, folder, out, *extra):
    env = {**os.environ, "QWEN2VL_MODEL": str(tiny_model), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "qwen2vl_cli", "batch", str(folder), "-o", str(out), "-b", "1",
                             "-n", "40", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)


def _wait_for_lines(out, count, process, limit=120):
    deadline = time.time() + limit
    while time.time() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= count:
            return
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.05)
    raise AssertionError("the batch made no progress")


def test_resume_after_sigkill_loses_nothing_and_duplicates_nothing(tiny_model, tmp_path):
    paths = _many_images(tmp_path / "many", 24)
    out = tmp_path / "out.jsonl"
    process = _start_batch(tiny_model, tmp_path / "many", out)
    _wait_for_lines(out, 4, process)
    process.kill()  # SIGKILL: no cleanup at all
    process.wait()
    written = out.read_text()
    complete = [json.loads(line) for line in written.splitlines() if line.endswith("}")]
    assert 4 <= len(complete) < 24
    resumed = _start_batch(tiny_model, tmp_path / "many", out)
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr.decode()
    final = [json.loads(line) for line in out.read_text().splitlines()]  # every line valid JSON
    assert sorted(r["source"] for r in final) == sorted(map(str, paths))  # nothing missing, no duplicates
    assert all(r["error"] is None and r["text"] for r in final)
    assert f"{len(complete)} skipped (already done)".encode() in stderr


def test_ctrl_c_finishes_cleanly_with_130(tiny_model, tmp_path):
    _many_images(tmp_path / "many", 24)
    out = tmp_path / "out.jsonl"
    process = _start_batch(tiny_model, tmp_path / "many", out)
    _wait_for_lines(out, 2, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr.decode()
    assert b"batch interrupted:" in stderr and b"Traceback" not in stderr
    lines = out.read_text().splitlines()
    assert all(json.loads(line)["error"] is None for line in lines)


@pytest.mark.parametrize("arguments, typed, said", [
    (["-"], "{a}", "reading sources from the terminal, one a line (Ctrl-D ends the list)"),
    (["--manifest", "-"], '{{"source": "{a}"}}', "reading the manifest from the terminal, one JSON object a line "
                                                 "(Ctrl-D ends it)")])
def test_a_list_typed_at_the_terminal_is_said_to_be_awaited(tiny_model, images, arguments, typed, said):
    """`batch -` and `--manifest -` with stdin a terminal say what they read from it until Ctrl-D (rather than
    waiting in silence), then caption what was typed."""
    main, terminal = os.openpty()
    try:
        command = [sys.executable, "-m", "qwen2vl_cli", "batch", *arguments, "-m", str(tiny_model), "-n", "4"]
        process = subprocess.Popen(command, stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                                   env={**os.environ, "QWEN2VL_AUTOSTART": "0"})
        os.write(main, typed.format(a=images["a"]).encode() + b"\n\x04")
        out, err = process.communicate(timeout=120)
    finally:
        os.close(main)
        os.close(terminal)
    assert process.returncode == 0, err
    assert err.startswith(f"qwen2vl: {said}\n".encode()), err
    assert [json.loads(line)["source"] for line in out.splitlines()] == [str(images["a"])]


def test_stdin_for_both_the_list_and_the_manifest_is_a_usage_error(tiny_model, images):
    """stdin is read once: `batch - --manifest -` is refused at once (it was an unexpected error, exit 1)."""
    result = subprocess.run([sys.executable, "-m", "qwen2vl_cli", "batch", "-", "--manifest", "-", "-m", str(tiny_model)],
                            input=json.dumps({"source": str(images["a"])}).encode(), capture_output=True, cwd=ROOT,
                            env={**os.environ, "QWEN2VL_AUTOSTART": "0"}, timeout=120)
    assert result.returncode == 2 and result.stdout == b""
    assert result.stderr.decode().strip().splitlines() == [
        "qwen2vl: error: -: stdin is read once: pipe in either the list of sources or the manifest, not both"]


def test_a_video_given_as_an_image_is_said_to_be_one(cli, clips, tmp_path):
    """`describe clip.mp4`, or a clip `batch` cannot tell by its name, says where a video goes; a HEIC-branded or
    plain unknown file stays "not an image"."""
    said = cli("describe", clips / "walk.mp4", "-n", "2")
    assert said.exit_code == 3 and "a video, not an image: give it as one (`qwen2vl video`" in said.stderr and said.stdout == ""
    unnamed = tmp_path / "upload.bin"
    unnamed.write_bytes((clips / "walk.mp4").read_bytes())
    result = cli("batch", unnamed, "-n", "2")
    assert result.exit_code == 5 and "a video, not an image" in records(result.stdout)[0]["error"]
    matroska = tmp_path / "clip.data"
    matroska.write_bytes(b"\x1a\x45\xdf\xa3" + bytes(60))
    assert "a video, not an image" in cli("describe", matroska).stderr
    other = tmp_path / "other.data"
    other.write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(60))
    assert "a video" not in cli("describe", other).stderr


def test_an_image_given_as_a_video_and_a_folder_given_as_an_image_say_where_they_go(cli, clips, tree):
    image = cli("video", clips / "photo.png", "-n", "2")
    assert image.exit_code == 3 and "an image, not a video: give it as one (`qwen2vl describe`" in image.stderr
    folder = cli("describe", tree, "-n", "2")
    assert folder.exit_code == 3 and "is a directory, not a file (`qwen2vl batch DIR` captions a folder" in folder.stderr
    noise = cli("video", clips / "broken.mp4", "-n", "2")  # neither: FFmpeg's words
    assert noise.exit_code == 3 and "not a readable video" in noise.stderr and "an image" not in noise.stderr


def test_sidecars_for_a_file_listed_with_several_prompts_are_refused(cli, tree, tmp_path):
    """A sidecar holds one caption: a manifest asking two things of one file would keep only the last answer, so
    the run is refused before it starts, and -o is left as it was (unlocked, unwritten)."""
    manifest = tmp_path / "two.jsonl"
    manifest.write_text(json.dumps({"source": str(tree / "a.png"), "prompt": "What colour?"}) + "\n"
                        + json.dumps({"source": f"{tree}/./a.png", "prompt": "What shape?"}) + "\n")
    out = tmp_path / "out.jsonl"
    refused = cli("batch", "--manifest", manifest, "--sidecar", "-o", out, "-n", "4")
    assert refused.exit_code == 2 and "listed several times (prompts" in refused.stderr, refused.stderr
    assert not (tree / "a.txt").exists() and not out.exists() and not list(tmp_path.glob(".*lock"))
    kept = cli("batch", "--manifest", manifest, "-o", out, "-n", "4")  # -o keeps both answers
    assert kept.exit_code == 0 and len(records(out.read_text())) == 2


def test_what_was_cut_from_the_clips_is_said_a_few_times_not_once_a_clip(cli, tmp_path):
    """Frames capped at --max-frames, as `video` says it: the first three on stderr, then how many more;
    --verbose says each."""
    folder = tmp_path / "long"
    folder.mkdir()
    for index in range(5):
        make_video(folder / f"c{index}.mp4", frames=20, fps=10, width=56, height=56, seed=index, noise=False)
    result = cli("batch", folder, "-n", "2", "--fps", "10", "--max-frames", "4")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.count("sampled 4 frames instead of 20 (--max-frames 4)") == 3
    assert "2 more notes like these on the items' media (--verbose shows each)" in result.stderr
    every = cli("batch", folder, "-n", "2", "--fps", "10", "--max-frames", "4", "-v")
    assert every.stderr.count("sampled 4 frames instead of 20") == 5 and "more notes" not in every.stderr


def test_a_csv_manifest_is_read_as_a_jsonl_one(cli, tree, tmp_path):
    """A spreadsheet's export (a BOM, CRLF line ends, a quoted cell with a comma and a line break, an empty prompt
    cell for the run's prompt) gives the same records as the JSON Lines manifest of the same rows."""
    rows = [{"source": str(tree / "a.png"), "prompt": "", "id": "7", "note": "red, mostly\nsquare"},
            {"source": str(tree / "sub" / "b with space é.png"), "prompt": "What colour dominates?", "id": "8",
             "note": ""}]
    sheet = tmp_path / "todo.csv"
    with open(sheet, "w", encoding="utf-8-sig", newline="") as handle:
        writer = csv.DictWriter(handle, ["source", "prompt", "id", "note"], lineterminator="\r\n")
        writer.writeheader()
        writer.writerows(rows)
    lines = tmp_path / "todo.jsonl"
    lines.write_text("".join(json.dumps({k: v for k, v in r.items() if v or k != "prompt"}) + "\n" for r in rows))
    from_csv = cli("batch", "--manifest", sheet, "-n", "6")
    assert from_csv.exit_code == 0, from_csv.stderr
    assert records(from_csv.stdout) == records(cli("batch", "--manifest", lines, "-n", "6").stdout)
    assert records(from_csv.stdout)[0]["text"] == alone(cli, tree / "a.png", "-n", "6")
    for text, said in (("path,prompt\na.png,hi\n", "needs a header row with a 'source' column"),
                       (f"source,id\n{tree / 'a.png'},1,extra\n", "todo.csv line 2: 2 columns in the header"),
                       ("source,text\nx.png,caption\n", "field 'text' is the result's own"),
                       ('source\n"a.png\n', "not valid CSV (unexpected end of data)")):
        sheet.write_text(text)
        refused = cli("batch", "--manifest", sheet)
        assert refused.exit_code == 3 and said in refused.stderr, refused.stderr


def test_once_stopped_no_more_items_of_the_window_are_decoded(monkeypatch):
    """Ctrl-C during a window of decodes (64 photos, or long clips): those not started yet are not started (each
    worker finishes the one in hand), so the run exits after one decode, not the window's."""
    import queue
    import threading

    from qwen2vl_cli.batch import runner
    from qwen2vl_cli.batch.inputs import BatchItem

    stop, calls = threading.Event(), []

    def decode(item, session, config):
        calls.append(item.source)
        stop.set()  # Ctrl-C while the first items are decoded
        time.sleep(0.2)
        return item, None, "no such file"

    monkeypatch.setattr(runner, "_decode", decode)
    config = runner.BatchConfig(None, None, runner.ImageOptions(), runner.FetchLimits(), runner.GenerationOptions(),
                                workers=2)
    ready = queue.Queue(maxsize=4)
    runner._produce([BatchItem(f"photo{i}.jpg") for i in range(8)], None, config, ready, stop)  # one window
    assert 1 <= len(calls) <= 2 and ready.empty()  # nothing handed over once stopped


def test_a_manifest_captions_parts_of_a_video_each_its_own_item(cli, clips, tmp_path):
    """video_start/video_end (seconds, qwen-vl-utils' names) on a manifest line: that part of the clip, as
    `qwen2vl video --start --end` sees it; parts of one clip are items of their own, resumed by their part, from
    a JSONL manifest or a CSV one alike; a part given to an image, or not a number, is refused (exit 3)."""
    walk = clips / "walk.mp4"  # 2 s
    parts = [{"source": str(walk), "video_start": 0, "video_end": 1}, {"source": str(walk), "video_start": 1},
             {"source": str(walk)}]
    manifest = tmp_path / "parts.jsonl"
    manifest.write_text("".join(json.dumps(p) + "\n" for p in parts))
    out = tmp_path / "out.jsonl"
    result = cli("batch", "--manifest", manifest, "-n", "8", "--nframes", "4", "-o", out)
    assert result.exit_code == 0, result.stderr
    by_part = {(r.get("video_start"), r.get("video_end")): r["text"] for r in records(out.read_text())}
    for (start, end), text in by_part.items():
        window = [*(["--start", str(start)] if start is not None else []), *(["--end", str(end)] if end is not None else [])]
        assert text == cli("video", walk, "-n", "8", "--nframes", "4", *window).stdout[:-1], (start, end)
    assert len(set(by_part.values())) == 3, "three parts, three answers: the test can fail"
    sheet = tmp_path / "parts.csv"
    sheet.write_text(f"source,video_start,video_end\n{walk},0,1\n{walk},1.0,\n{walk},,\n")
    again = cli("batch", "--manifest", sheet, "-n", "8", "--nframes", "4", "-o", out)
    assert again.exit_code == 0 and "0 done, 3 skipped (already done)" in again.stderr, again.stderr
    for line, said in (({"source": str(clips / "photo.png"), "video_start": 1}, "are for videos"),
                       ({"source": str(walk), "video_start": "soon"}, "video_start must be a number of seconds"),
                       ({"source": str(walk), "video_start": True}, "video_start must be a number of seconds"),
                       ({"source": str(walk), "video_start": 1, "video_end": 1}, "is not after video_start")):
        manifest.write_text(json.dumps(line) + "\n")
        refused = cli("batch", "--manifest", manifest)
        assert refused.exit_code == 3 and said in refused.stderr, refused.stderr
    manifest.write_text("".join(json.dumps(p) + "\n" for p in parts))
    sidecars = cli("batch", "--manifest", manifest, "--sidecar", "-n", "4")
    assert sidecars.exit_code == 2 and "listed several times" in sidecars.stderr
