"""Where batch results go, durably: JSONL or CSV files (one fsync'd record per item, a torn last record
repaired on resume), stdout, and sidecar caption files written to a temporary name and renamed.

Each sink also says which items already have a result (and whether it was an error), which is what makes a
rerun resume; a results file is owned by one run at a time (a lock beside it)."""

from __future__ import annotations

import csv
import errno
import functools
import io
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, TextIO

from ..errors import FULL, InputError, OutputError, UsageError
from ..render import json_line
from ..sources import file_url_to_path
from .inputs import item_key, segment_of

BASE_FIELDS = ("source", "text", "error", "finish_reason")  # a new CSV file's first columns
OWN_FIELDS = BASE_FIELDS[:3]  # what a results file of ours has (one written before finish_reason too)


@functools.cache
def _umask() -> int:
    """The process's umask: Linux says it in /proc; elsewhere it is read by setting it and back (the sidecar sink asks
    at its start, on the main thread, before any other thread writes files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _fsync(handle) -> None:
    handle.flush()
    try:
        os.fsync(handle.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        pass  # pipes and terminals cannot be synced


def truncate_torn_tail(path: Path, note: Callable[[str], None]) -> bytes:
    """Drop a last record that a killed run left half-written; return the intact bytes."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as handle:
            handle.truncate(keep)
            _fsync(handle)
        note(f"{path}: repaired a torn last record left by an interrupted run")
        data = data[:keep]
    return data


class OutputLock:
    """`.NAME.qwen2vl-lock` beside a results file, flock'ed while a run writes it: a second run on the same
    file refuses at once instead of writing every record twice."""

    def __init__(self, path: Path) -> None:
        import fcntl

        self.path = path.with_name(f".{path.name}.qwen2vl-lock")
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise OutputError(str(path), "another qwen2vl batch is writing it"
                                                 + (f" (pid {owner})" if owner else "")
                                                 + "; wait for it to finish or choose another -o") from None
                raise
            try:  # the file we locked may have been removed by a run that just finished: lock the new one
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


class RecordFile:
    """What every results file shares: the items it holds a record for (True: the record is an error)."""

    records: dict[tuple, bool]
    handle: TextIO
    lock: OutputLock | None = None

    def state(self, item) -> str | None:
        """None (no record for the BatchItem), 'ok' or 'error'."""
        key = item.key
        return None if key not in self.records else "error" if self.records[key] else "ok"

    def _remember(self, record: dict) -> None:
        self.records[item_key(record["source"], record.get("prompt") or None, segment_of(record))] = bool(record.get("error"))

    def close(self) -> None:
        self.handle.close()
        if self.lock is not None:
            self.lock.release()


class JsonlSink(RecordFile):
    """JSON Lines, appended; valid JSONL at every moment."""

    def __init__(self, path: Path | None, *, overwrite: bool, retry_errors: bool, note: Callable[[str], None],
                 stream: TextIO | None = None) -> None:
        self.path = path
        self.records: dict[tuple, bool] = {}
        if path is None:
            self.handle = stream or sys.stdout
            return
        if path.exists() and not overwrite:
            data = path.read_bytes()  # ours: a record, or a first one a killed run left torn
            _refuse_foreign(path, any(_result(line) for line in data.splitlines())
                            or (b"\n" not in data and data.startswith(b'{"source": ')))
        self.lock = OutputLock(path)
        if path.exists() and not overwrite:
            kept = []
            for number, line in enumerate(truncate_torn_tail(path, note).decode("utf-8", "replace").splitlines(), 1):
                record = _result(line)
                if record is None:
                    note(f"{path} line {number}: not a result record; left as it is")
                    kept.append(line)
                    continue
                if retry_errors and record.get("error"):
                    continue
                self._remember(record)
                kept.append(line)
            if retry_errors:
                _atomic_write(path, "".join(line + "\n" for line in kept))
        self.handle = open(path, "w" if overwrite else "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.handle.write(json_line(record))
        _fsync(self.handle)

    def close(self) -> None:
        if self.path is not None:  # stdout stays open
            super().close()


def _result(line: str | bytes) -> dict | None:
    """A JSONL results file's record (source, text, error), or None for a line that is not one."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    ours = isinstance(record, dict) and isinstance(record.get("source"), str) and {"text", "error"} <= set(record)
    return record if ours else None


def _refuse_foreign(path: Path, ours: bool) -> None:
    """A file -o names that holds something and no qwen2vl results (a dataset's CSV, a manifest) is left alone: a
    usage error before a byte of it is repaired, appended to or read as done."""
    with open(path, "rb") as handle:
        if ours or not handle.read(1 << 16).strip():
            return
    raise UsageError(str(path), "holds something other than qwen2vl's results (source, text, error): choose "
                                "another -o, or --overwrite to replace it")


class CsvSink(RecordFile):
    """CSV with a header (source, text, error, then the manifest's extra fields)."""

    def __init__(self, path: Path, fields: list[str], *, overwrite: bool, retry_errors: bool,
                 note: Callable[[str], None]) -> None:
        self.path = path
        self.records: dict[tuple, bool] = {}
        header = None
        if path.exists() and not overwrite:
            with open(path, encoding="utf-8", errors="surrogateescape", newline="") as handle:
                first = next(csv.reader([handle.readline()]), [])
            _refuse_foreign(path, set(OWN_FIELDS) <= set(first))
        self.lock = OutputLock(path)
        if path.exists() and not overwrite:
            rows, header = _read_csv(path, note)
            if retry_errors:
                rows = [row for row in rows if not row.get("error")]
                _atomic_write(path, _csv_text(header, rows))
            for row in rows:
                if row.get("source"):
                    self._remember(row)
        self.fields = header or [*BASE_FIELDS, *[f for f in fields if f not in BASE_FIELDS]]
        left_out = [field for field in fields if field not in self.fields]
        if left_out:  # a resumed file keeps its columns: say which of this run's fields it has no column for
            note(f"{path} has no column for {', '.join(left_out)}: those fields are not written (a .jsonl would keep "
                 "them, or --overwrite starts the file with them)")
        fresh = overwrite or not path.exists() or path.stat().st_size == 0
        # a file name that is not UTF-8 goes in as its own bytes (surrogateescape), and is read back the same way
        self.handle = open(path, "w" if fresh else "a", encoding="utf-8", errors="surrogateescape", newline="")
        self.writer = csv.DictWriter(self.handle, self.fields, extrasaction="ignore", lineterminator="\n")
        if fresh:
            self.writer.writeheader()
            _fsync(self.handle)

    def write(self, record: dict) -> None:
        row = {k: ("" if v is None else v if isinstance(v, str) else json.dumps(v, ensure_ascii=False))
               for k, v in record.items()}
        self.writer.writerow(row)
        _fsync(self.handle)


def _read_csv(path: Path, note: Callable[[str], None]) -> tuple[list[dict], list[str] | None]:
    """The intact rows of a CSV file; a record cut off mid-way (even inside quotes) is dropped."""
    data = truncate_torn_tail(path, note).decode("utf-8", "surrogateescape")
    while data:
        try:
            reader = csv.DictReader(io.StringIO(data, newline=""), strict=True)
            rows = list(reader)
            if rows and None in rows[-1]:
                raise csv.Error("too many fields")
            if rows and any(v is None for v in rows[-1].values()):
                raise csv.Error("too few fields")
            return rows, list(reader.fieldnames or []) or None
        except csv.Error:
            cut = data.rstrip("\n").rfind("\n") + 1  # drop the last line and try again
            data = data[:cut]
            with open(path, "r+b") as handle:
                handle.truncate(len(data.encode("utf-8", "surrogateescape")))
                _fsync(handle)
            note(f"{path}: repaired a torn last record left by an interrupted run")
    return [], None


def _csv_text(header: list[str] | None, rows: list[dict]) -> str:
    if not header:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _atomic_write(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, fsync, rename over it: readers see old or new, never half. The file
    keeps its permissions, or gets a new file's (the umask's), not the temporary file's private 0600."""
    try:
        mode = os.stat(path).st_mode & 0o7777
    except OSError:
        mode = 0o666 & ~_umask()
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".qwen2vl-tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with open(fd, "w", encoding="utf-8", errors="surrogateescape") as handle:
            handle.write(text)
            _fsync(handle)
        os.replace(temporary, path)
    except BaseException:  # a full disk or an interrupt leaves no temporary file behind
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


class ItemNotWritten(Exception):
    """A sink could not keep one item's answer (its sidecar's place is a folder, or not writable): that item fails,
    the run goes on (a full disk is not this: it stops the run, exit 7)."""


class SidecarSink:
    """`photo.jpg` -> `photo.txt` beside it (prefix + caption + suffix); existing ones are kept. An answer with no
    file to sit beside (a URL's, stdin's, or an image named with the sidecars' own extension: its sidecar would be
    itself) goes to `elsewhere` (stdout, where no -o is given), not nowhere. Files of the run that would share one
    (`IMG_1.HEIC` and `IMG_1.MOV`, a phone's live photo) each get theirs named after the whole file name
    (`IMG_1.HEIC.txt`, `IMG_1.MOV.txt`), so that neither caption replaces the other; a file listed with several
    prompts (a manifest's) is a UsageError: its one sidecar would keep only the last caption."""

    def __init__(self, extension: str, prefix: str, suffix: str, overwrite: bool,
                 elsewhere: JsonlSink | None = None, items: list = (),
                 note: Callable[[str], None] = lambda message: None) -> None:
        self.extension = "." + extension.lstrip(".")
        _umask()  # read now, on the main thread
        self.prefix, self.suffix, self.overwrite, self.elsewhere = prefix, suffix, overwrite, elsewhere
        self.shared: set[str] = set()  # sidecar places two files of the run would take
        claims: dict[str, set[str]] = {}
        prompted: dict[str, str] = {}  # a file -> how it was first named
        for item in items:
            path = self.path_for(item.source)
            if path is None:
                continue
            file = os.path.realpath(self._file(item.source))
            if file in prompted:
                raise UsageError("--sidecar", f"{prompted[file]} is listed several times (prompts, parts of a video) "
                                              "and a sidecar holds one caption: write the answers to -o FILE.jsonl "
                                              "instead")
            prompted[file] = item.source
            claims.setdefault(_place(path), set()).add(file)
        self.shared = {place for place, files in claims.items() if len(files) > 1}
        if self.shared:
            example = sorted(self.shared)[0]
            names = sorted(Path(file).name for file in claims[example])
            note(f"{sum(len(claims[place]) for place in self.shared)} files would share a sidecar with another "
                 f"({' and '.join(names)}): theirs are named after the whole file name "
                 f"({names[0]}{self.extension})")

    @staticmethod
    def _file(source: str) -> Path | None:
        """The file a source names, or None for a URL, data URI or stdin."""
        if source.startswith(("http://", "https://", "data:", "-")):
            return None
        if source.startswith("file://"):  # file:///a/b%20c.jpg -> /a/b c.jpg, file://localhost/... too
            try:
                return file_url_to_path(source)
            except InputError:
                return None
        return Path(os.path.expanduser(source))

    def path_for(self, source: str) -> Path | None:
        image = self._file(source)
        if image is None:
            return None
        path = image.with_suffix(self.extension)
        if path == image:  # never the image itself
            return None
        return image.with_name(image.name + self.extension) if _place(path) in self.shared else path

    def state(self, item) -> str | None:
        path = self.path_for(item.source)  # beside the file as named, where write() puts it
        return "ok" if not self.overwrite and path is not None and path.is_file() else None

    def write(self, record: dict) -> None:
        path = self.path_for(record["source"])
        if record.get("error"):
            return
        if path is None:
            if self.elsewhere is not None:
                self.elsewhere.write(record)
            return
        try:
            _atomic_write(path, f"{self.prefix}{record['text']}{self.suffix}")
        except OSError as exc:
            if exc.errno in FULL:
                raise
            raise ItemNotWritten(f"cannot write its sidecar {path} ({exc.strerror or exc})") from None

    def close(self) -> None:
        if self.elsewhere is not None:  # every sidecar is closed as it is written
            self.elsewhere.close()


def _place(path: Path) -> str:
    """A sidecar's place however its folder is written (imgs/, ./imgs/, a link to it)."""
    return os.path.join(os.path.realpath(path.parent), path.name)


def sidecar_extension(text: str, images: tuple[str, ...]) -> str:
    """--sidecar-ext as a file name's suffix ('txt', '.caption'), checked: one that names no file or leaves the
    folder, and one of the images' own (`images`: the captions would replace the photos), are usage errors."""
    extension = text.lstrip(".")
    if not extension or any(c in extension for c in "/\\\0") or extension.strip() != extension:
        raise UsageError(f"--sidecar-ext {text!r}", "give an extension such as txt or caption")
    if extension.lower() in images:
        raise UsageError(f"--sidecar-ext {text}", "is an image extension: the captions would replace the images")
    return extension


def open_output(output: str | None, fields: list[str], *, overwrite: bool, retry_errors: bool,
                note: Callable[[str], None], stream: TextIO | None = None):
    """The result sink for -o FILE (.jsonl or .csv), or stdout when no file is named."""
    if output is None or output == "-":
        return JsonlSink(None, overwrite=False, retry_errors=False, note=note, stream=stream)
    path = Path(os.path.expanduser(output))
    if path.is_dir():
        raise UsageError(output, "-o names a directory; give a .jsonl or .csv file")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".ndjson", ".json"):
        raise UsageError(output, "-o takes a .jsonl or .csv file")
    if not path.parent.is_dir():
        raise OutputError(output, f"no such directory: {path.parent}")
    try:  # before the model loads: an unwritable -o fails in a second, not after the load
        if suffix == ".csv":
            return CsvSink(path, fields, overwrite=overwrite, retry_errors=retry_errors, note=note)
        return JsonlSink(path, overwrite=overwrite, retry_errors=retry_errors, note=note)
    except OSError as exc:
        if exc.errno in FULL:
            raise
        raise OutputError(output, exc.strerror or str(exc)) from None
