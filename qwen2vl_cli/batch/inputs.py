"""What a batch run works on: image and video files, directories, globs, stdin lists and JSONL or CSV manifests,
turned into BatchItems; what cannot be an item (symlink loops, unreadable directories, other files) is noted."""

from __future__ import annotations

import glob
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, TextIO

from ..errors import InputError
from ..sources import encodable, file_url_to_path, open_regular, refuse_empty
from ..video import VIDEO_EXTENSIONS, is_video_file

MAX_LINE = 1024 * 1024  # one manifest line or listed path; data URIs in a manifest stay well under it
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "heic", "heif", "avif")  # phones' too
DEFAULT_EXTENSIONS = IMAGE_EXTENSIONS + VIDEO_EXTENSIONS  # a phone's folder whole


RESERVED_FIELDS = ("source", "prompt", "text", "error", "finish_reason")  # a record's own: a manifest sets source/prompt
SEGMENT_FIELDS = ("video_start", "video_end")  # a manifest's part of a video, in seconds (qwen-vl-utils' names)


@dataclass
class BatchItem:
    """One image or video to caption, with its prompt (None: the run's prompt) and extra output fields."""

    source: str
    prompt: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """"video" for a source named as one (video.is_video_file: clip.mp4, data:video/...), else "image"."""
        return "video" if is_video_file(self.source) else "image"

    @property
    def segment(self) -> tuple:
        """(video_start, video_end) a manifest set, in seconds; None where it set none."""
        return segment_of(self.extra)

    @property
    def key(self) -> tuple:
        return item_key(self.source, self.prompt, self.segment)


def segment_of(record: dict) -> tuple:
    """A manifest line's or a result record's (video_start, video_end): numbers, however written (a CSV's "1.5")."""
    values = []
    for name in SEGMENT_FIELDS:
        value = record.get(name)
        try:
            values.append(None if value in (None, "") else float(value))
        except (TypeError, ValueError):
            values.append(value)  # not a number: only a manifest's check says so, a record keeps it as it is
    return tuple(values)


def item_key(source: str, prompt: str | None, segment: tuple = (None, None)) -> tuple:
    """What makes an item one: its file, however it is written (imgs/x.png, ./imgs/x.png, file://...), its own
    prompt, and the part of a video a manifest names. Results on record are matched by the same key, so a resume
    skips exactly what is done."""
    if is_remote(source) or source == "-" or not source:
        return source, prompt, segment
    if source.startswith("file://"):
        try:
            path = str(file_url_to_path(source))
        except InputError:
            return source, prompt, segment
    else:
        path = os.path.expanduser(source)
    return os.path.realpath(path), prompt, segment


def parse_extensions(text: str | None) -> tuple[str, ...]:
    """'jpg,.PNG, webp' -> ('jpg', 'png', 'webp')."""
    if not text:
        return DEFAULT_EXTENSIONS
    return tuple(part.strip().lstrip(".").lower() for part in text.split(",") if part.strip())


def is_remote(source: str) -> bool:
    return source.startswith(("http://", "https://", "data:"))


def walk_directory(root: Path, extensions: tuple[str, ...], recursive: bool,
                   note: Callable[[str], None]) -> Iterable[Path]:
    """Files below `root` with one of `extensions`, in a stable order; symlink loops and unreadable folders are
    noted, not fatal. Hidden entries are passed over, as a shell's glob passes them: macOS's `._photo.jpg` (AppleDouble metadata,
    not an image), `.thumbnails/`, `.git/` (a file named on the command line is taken, hidden or not)."""
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            stat = folder.stat()
        except OSError as exc:
            note(f"skipped {folder}: {exc.strerror or exc}")
            continue
        if (stat.st_dev, stat.st_ino) in seen:
            note(f"skipped {folder}: symlink loop")
            continue
        seen.add((stat.st_dev, stat.st_ino))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            note(f"skipped {folder}: {exc.strerror or exc}")
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                if entry.is_dir():
                    if recursive:
                        subfolders.append(path)
                    continue
                if not entry.is_file():
                    continue
            except OSError as exc:
                note(f"skipped {path}: {exc.strerror or exc}")
                continue
            if path.suffix.lower().lstrip(".") in extensions:
                yield path
        stack.extend(reversed(subfolders))


def byte_faithful(stream: TextIO | None) -> TextIO | None:
    """`stream` (stdin) reading a path that is not UTF-8 as Python names such files (surrogateescape), as a list
    or manifest file is read, not as an error (a strict UTF-8 locale) or a lookalike that names no file."""
    if stream is not None and hasattr(stream, "reconfigure"):
        stream.reconfigure(errors="surrogateescape")
    return stream


def _stdin(given: TextIO | None, note: Callable[[str], None], what: str, how: str) -> TextIO:
    """stdin (or `given`) to read a list or manifest from: closed is an input error; a terminal, nothing piped in, is
    said to be what it waits for (not silence)."""
    stream = given or byte_faithful(sys.stdin)
    if stream is None:
        raise InputError("stdin", "closed")
    if stream.isatty():
        note(f"reading {what} from the terminal, {how}")
    return stream


def bounded_lines(handle: TextIO, name: str) -> Iterator[str]:
    """The lines of a list or manifest, each at most MAX_LINE characters (/dev/zero has no line ends)."""
    number = 0
    while True:
        line = handle.readline(MAX_LINE + 1)
        if not line:
            return
        number += 1
        if len(line) > MAX_LINE:
            raise InputError(f"{name} line {number}", f"longer than {MAX_LINE} characters: not a list of sources")
        yield line


def read_manifest(path: str, note: Callable[[str], None] = lambda message: None) -> list[BatchItem]:
    """One JSON object a line: `source`, optional `prompt`, any other fields (copied to the output); or a CSV
    file (`.csv`) with a header naming a `source` column, an optional `prompt` (empty: the run's), and others."""
    if path == "-":
        handle = _stdin(None, note, "the manifest", "one JSON object a line (Ctrl-D ends it)")
    else:  # a regular file: a FIFO or /dev/zero named by mistake must not hang or fill memory
        handle = open(open_regular(Path(os.path.expanduser(path)), path), encoding="utf-8-sig", errors="surrogateescape",
                      newline="")
    with handle:
        if path != "-" and path.lower().endswith(".csv"):
            return _csv_manifest(handle, path)
        items = []
        for number, line in enumerate(bounded_lines(handle, path), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path} line {number}", f"not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise InputError(f"{path} line {number}", "needs an object with a 'source' (a path or URL)")
            items.append(_manifest_item(record, f"{path} line {number}"))
    return items


def _csv_manifest(handle: TextIO, path: str) -> list[BatchItem]:
    import csv

    reader = csv.DictReader(bounded_lines(handle, path), strict=True)
    items = []
    try:
        if "source" not in (reader.fieldnames or []):
            raise InputError(path, "a CSV manifest needs a header row with a 'source' column")
        for row in reader:
            if None in row or None in row.values():  # more cells than the header names, or fewer
                raise InputError(f"{path} line {reader.line_num}", f"{len(reader.fieldnames)} columns in the header, "
                                                                   "a different number here")
            if not any(row.values()):
                continue
            if not row.get("prompt"):
                row.pop("prompt", None)  # an empty cell: the run's prompt
            items.append(_manifest_item(row, f"{path} line {reader.line_num}"))
    except csv.Error as exc:
        raise InputError(f"{path} line {reader.line_num}", f"not valid CSV ({exc})") from None
    return items


def _manifest_item(record: dict, where: str) -> BatchItem:
    """A manifest's record (a JSON object, a CSV row) as an item, checked."""
    if not isinstance(record.get("source"), str) or not record["source"]:
        raise InputError(where, "needs a 'source' (a path or URL)")
    prompt = record.pop("prompt", None)
    if prompt is not None and not isinstance(prompt, str):
        raise InputError(where, "'prompt' must be a string")
    if prompt is not None and not encodable(prompt):
        raise InputError(where, "'prompt' is not valid UTF-8 text")
    clash = [name for name in RESERVED_FIELDS if name in record and name != "source"]
    if clash:  # copied through, they would overwrite the answer
        raise InputError(where, f"field {clash[0]!r} is the result's own; rename it (e.g. to 'reference_{clash[0]}')")
    item = BatchItem(record.pop("source"), prompt, record)
    start, end = item.segment
    if (start, end) != (None, None):
        if item.kind != "video":
            raise InputError(where, f"video_start/video_end are for videos; {item.source} is read as an image")
        for name, value in zip(SEGMENT_FIELDS, (start, end)):
            if value is not None and (not isinstance(value, float) or not 0 <= value < float("inf")
                                      or isinstance(record[name], bool)):
                raise InputError(where, f"{name} must be a number of seconds, at least 0")
        if None not in (start, end) and end <= start:
            raise InputError(where, f"video_end {record['video_end']} is not after video_start {record['video_start']}")
    return item


def collect_items(inputs: list[str], *, manifest: str | None = None, recursive: bool = False,
                  extensions: tuple[str, ...] = DEFAULT_EXTENSIONS, stdin: TextIO | None = None,
                  note: Callable[[str], None] = lambda message: None) -> list[BatchItem]:
    """All items in input order, each source once."""
    items: list[BatchItem] = read_manifest(manifest, note) if manifest else []
    for spec in inputs:
        refuse_empty(spec)  # not the current directory, captioned whole
        if spec == "-":
            stream = _stdin(stdin, note, "sources", "one a line (Ctrl-D ends the list)")
            lines = [line.rstrip("\r\n") for line in bounded_lines(stream, "stdin") if line.strip()]
            items += [BatchItem(line) for line in lines]
            continue
        path = Path(os.path.expanduser(spec))
        if is_remote(spec) or path.is_file():
            items.append(BatchItem(spec))  # named explicitly: taken whatever its extension
        elif path.is_dir():
            found = list(walk_directory(path, extensions, recursive, note))
            if not found:
                note(f"no images or videos in {spec}" + ("" if recursive else " (use -r for subfolders)"))
            items += [BatchItem(str(p)) for p in found]
        elif any(c in spec for c in "*?["):
            matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
            files = [m for m in matches if os.path.isfile(m) and Path(m).suffix.lower().lstrip(".") in extensions]
            if not files:
                note(f"no images or videos match {spec}")
            items += [BatchItem(m) for m in files]
        else:
            items.append(BatchItem(spec))  # missing: it gets its own error record
    unique: dict[tuple, BatchItem] = {}
    for item in items:
        if item.key in unique:
            twice = item.source if item.source == unique[item.key].source else f"{unique[item.key].source} and {item.source}"
            same = " and ".join(what for what, given in (("prompt", item.prompt), ("part", item.segment != (None, None)))
                                if given)
            note(f"{twice}: the same file {f'with the same {same} ' if same else ''}listed twice; captioned once")
            continue
        unique[item.key] = item
    return list(unique.values())
