"""Before the heavy load: where a model's files are, that they are all there and whole, and whether the hub
can be reached. Every failure is a ModelLoadError (exit 4) naming what is missing; nothing here imports torch.

A directory without config.json once made transformers eat 24 GB; a truncated safetensors file or a
missing tokenizer surfaced as "unexpected" errors; a first run without network spent minutes in retries.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from .errors import ModelLoadError

HUB_PROBE_TIMEOUT_S = 4.0
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~", ".\\")) or model.count("/") > 1 or os.sep == "\\"


def local_model_dir(model: str) -> Path | None:
    """The folder that holds the model's files: the directory given, or the hub id's cached snapshot (None
    when the hub id is not cached). A path that is not a directory is a ModelLoadError."""
    expanded = Path(os.path.expanduser(model))
    if expanded.is_file():
        raise ModelLoadError(model, "is a file; --model takes a model directory or a hub id")
    if expanded.is_dir():
        return expanded
    if looks_like_path(model):
        raise ModelLoadError(model, "no such model directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def validate_model_dir(folder: Path, model: str) -> None:
    """Config, weights (present and not truncated), tokenizer, processor and chat template, or ModelLoadError."""
    config = _read_json(folder / "config.json", model, "config.json")
    if config.get("model_type") not in ("qwen2_vl", None):
        raise ModelLoadError(model, f"not a Qwen2-VL checkpoint (config.json says model_type "
                                    f"{config.get('model_type')!r})")
    for weights in _weight_files(folder, model):
        if weights.suffix == ".safetensors":
            _check_safetensors(weights, model)
    if not (folder / "tokenizer.json").is_file() and not ((folder / "vocab.json").is_file()
                                                          and (folder / "merges.txt").is_file()):
        raise ModelLoadError(model, "no tokenizer (tokenizer.json, or vocab.json and merges.txt)")
    if not any((folder / name).is_file() for name in _PROCESSOR_FILES):
        raise ModelLoadError(model, "no image processor configuration (preprocessor_config.json)")
    if not any((folder / name).is_file() for name in _TEMPLATE_FILES) and not any(
            "chat_template" in _read_json(folder / name, model, name, missing_ok=True)
            for name in ("tokenizer_config.json", *_PROCESSOR_FILES)):
        raise ModelLoadError(model, "no chat template (chat_template.jinja, or one in tokenizer_config.json)")


def _read_json(path: Path, model: str, name: str, missing_ok: bool = False) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise ModelLoadError(model, f"no {name}: not a complete model directory") from None
    except PermissionError:
        raise ModelLoadError(model, f"{name}: permission denied") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(model, f"{name} is not valid JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(value, dict):
        raise ModelLoadError(model, f"{name} is not a JSON object")
    return value


def _weight_files(folder: Path, model: str) -> list[Path]:
    for index in _WEIGHT_INDEXES:
        if (folder / index).is_file():
            shards = sorted(set(_read_json(folder / index, model, index).get("weight_map", {}).values()))
            missing = [shard for shard in shards if not (folder / shard).is_file()]
            if missing or not shards:
                raise ModelLoadError(model, f"weights missing: {', '.join(missing[:3]) or 'none listed'} "
                                            f"(listed in {index})")
            return [folder / shard for shard in shards]
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    raise ModelLoadError(model, "no weights (model.safetensors or model.safetensors.index.json)")


def _check_safetensors(path: Path, model: str) -> None:
    """The header parses and the tensors it lists end where the file does (a cut download does not)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8)) if size >= 8 else (0,)
            if not 2 <= length <= min(size - 8, 100 * 1024 * 1024):
                raise ValueError
            header = json.loads(handle.read(length))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except PermissionError:
        raise ModelLoadError(model, f"{path.name}: permission denied") from None
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        raise ModelLoadError(model, f"{path.name} is not a readable safetensors file (truncated or corrupt)") from None
    if 8 + length + end > size:
        raise ModelLoadError(model, f"{path.name} is truncated ({size} of {8 + length + end} bytes)")


def hub_reachable() -> bool:
    """One quick request to the hub: any answer means reachable (seconds, not minutes of retries)."""
    import httpx
    from huggingface_hub import constants

    try:
        httpx.head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S, follow_redirects=False)
    except httpx.HTTPError:
        return False
    return True


def not_cached_message(model: str) -> str:
    return ("not in the Hugging Face cache and the hub cannot be reached; download it once on a connected "
            f"machine with `hf download {model}` (HF_HOME selects the cache), or pass --model DIR")


def explain_load_failure(model: str, exc: BaseException) -> str:
    """One line that says why a model did not load and how to fix it."""
    text = str(exc)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    if Path(os.path.expanduser(model)).is_dir():
        return f"not a loadable Qwen2-VL checkpoint ({first})"
    if hub_offline() or "offline" in text.lower() or "local_files_only" in text or "connect" in text.lower():
        return not_cached_message(model)
    return first
