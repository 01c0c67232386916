"""Where batch results go, durably: JSONL or CSV files (one fsync'd record per item, a torn last record
repaired on resume), stdout, and sidecar caption files written to a temporary name and renamed.

Each sink also says which sources already have a result, which is what makes a rerun resume."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Callable, TextIO

from ..errors import UsageError

BASE_FIELDS = ("source", "text", "error")


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


class RecordFile:
    """What every results file shares: the sources it already holds a record for."""

    done: set[str]
    handle: TextIO

    def has(self, source: str) -> bool:
        return source in self.done

    def close(self) -> None:
        self.handle.close()


class JsonlSink(RecordFile):
    """JSON Lines, appended; valid JSONL at every moment."""

    def __init__(self, path: Path | None, *, overwrite: bool, retry_errors: bool, note: Callable[[str], None],
                 stream: TextIO | None = None) -> None:
        self.path = path
        self.done: set[str] = set()
        if path is None:
            self.handle = stream or sys.stdout
            return
        if path.exists() and not overwrite:
            kept = []
            for number, line in enumerate(truncate_torn_tail(path, note).decode("utf-8", "replace").splitlines(), 1):
                try:
                    record = json.loads(line)
                    source = record["source"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    note(f"{path} line {number}: not a result record; left as it is")
                    kept.append(line)
                    continue
                if retry_errors and record.get("error"):
                    continue
                self.done.add(source)
                kept.append(line)
            if retry_errors:
                _atomic_write(path, "".join(line + "\n" for line in kept))
        self.handle = open(path, "w" if overwrite else "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        _fsync(self.handle)

    def close(self) -> None:
        if self.path is not None:  # stdout stays open
            self.handle.close()


class CsvSink(RecordFile):
    """CSV with a header (source, text, error, then the manifest's extra fields)."""

    def __init__(self, path: Path, fields: list[str], *, overwrite: bool, retry_errors: bool,
                 note: Callable[[str], None]) -> None:
        self.path = path
        self.done: set[str] = set()
        header = None
        if path.exists() and not overwrite:
            rows, header = _read_csv(path, note)
            if retry_errors:
                rows = [row for row in rows if not row.get("error")]
                _atomic_write(path, _csv_text(header, rows))
            self.done = {row["source"] for row in rows if row.get("source")}
        self.fields = header or [*BASE_FIELDS, *[f for f in fields if f not in BASE_FIELDS]]
        fresh = overwrite or not path.exists() or path.stat().st_size == 0
        self.handle = open(path, "w" if fresh else "a", encoding="utf-8", newline="")
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
    data = truncate_torn_tail(path, note).decode("utf-8", "replace")
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
                handle.truncate(len(data.encode("utf-8")))
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
    """Write to a temporary file beside `path`, fsync, rename over it: readers see old or new, never half."""
    temporary = path.with_name(f".{path.name}.qwen2vl-tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        _fsync(handle)
    os.replace(temporary, path)


class SidecarSink:
    """`photo.jpg` -> `photo.txt` beside it (prefix + caption + suffix); existing ones are kept."""

    def __init__(self, extension: str, prefix: str, suffix: str, overwrite: bool) -> None:
        self.extension = "." + extension.lstrip(".")
        self.prefix, self.suffix, self.overwrite = prefix, suffix, overwrite

    def path_for(self, source: str) -> Path | None:
        if source.startswith(("http://", "https://", "data:", "-")):
            return None
        path = Path(os.path.expanduser(source[7:] if source.startswith("file://") else source))
        return path.with_suffix(self.extension)

    def has(self, source: str) -> bool:
        path = self.path_for(source)
        return not self.overwrite and path is not None and path.exists()

    def write(self, record: dict) -> None:
        path = self.path_for(record["source"])
        if record.get("error") or path is None:
            return
        _atomic_write(path, f"{self.prefix}{record['text']}{self.suffix}")

    def close(self) -> None:
        pass  # every sidecar is closed as it is written


def open_output(output: str | None, fields: list[str], *, overwrite: bool, retry_errors: bool,
                note: Callable[[str], None], stream: TextIO | None = None):
    """The result sink for -o FILE (.jsonl or .csv), or stdout when no file is named."""
    if output is None or output == "-":
        return JsonlSink(None, overwrite=False, retry_errors=False, note=note, stream=stream)
    path = Path(os.path.expanduser(output))
    if path.is_dir():
        raise UsageError(output, "-o names a directory; give a .jsonl or .csv file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return CsvSink(path, fields, overwrite=overwrite, retry_errors=retry_errors, note=note)
    if suffix in (".jsonl", ".ndjson", ".json"):
        return JsonlSink(path, overwrite=overwrite, retry_errors=retry_errors, note=note)
    raise UsageError(output, "-o takes a .jsonl or .csv file")
