"""Passed fast-path checks, remembered per user: `decoder.enable`'s check (the stock model and the fast path
on probe prompts, 2-3 s of a load on an H200) is not run again for a load whose key is one that passed.

The key hashes everything the check's outcome depends on: the fast path's source (this folder and the session,
which makes the probes), the versions of the libraries under it, the GPU, the weights' dtype, the attention, the
model's config (quantization included). The file lives beside the session records ($QWEN2VL_STATE_DIR, by default
in $XDG_RUNTIME_DIR: a reboot, e.g. for a new driver, forgets it); deleting it means checking again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import time
from pathlib import Path

KEPT = 32  # the newest passed checks kept (one per model, dtype and software versions)
LIBRARIES = ("torch", "transformers", "triton", "gptqmodel", "optimum")
# devices whose passed checks are remembered: off CUDA the check costs little, and the tests break the fast path
# on purpose there to see the check catch it
REMEMBERED_ON = ("cuda",)


def checks_file() -> Path:
    from ...server.registry import state_dir

    return state_dir() / "fastpath-checks.json"


def key(model, device: str, quantization: str | None) -> str | None:
    """The hash a passed check is remembered under (see the module's docstring); None off REMEMBERED_ON."""
    if not device.startswith(REMEMBERED_ON):
        return None
    import torch

    from ... import __version__
    from ...compat import attn_implementation

    source = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for path in sorted(here.glob("*.py")) + [here.parent / "session.py", here.parent.parent / "compat.py"]:
        source.update(path.read_bytes())
    config = model.config.to_dict()
    config.pop("_name_or_path", None)
    index = torch.device(device).index or 0
    gpu = ([torch.cuda.get_device_name(index), list(torch.cuda.get_device_capability(index))]
           if device.startswith("cuda") else device)
    facts = {"qwen2vl": __version__, "source": source.hexdigest(), "dtype": str(model.dtype), "gpu": gpu,
             "attn": attn_implementation(model.config), "cuda": torch.version.cuda, "config": config,
             "quantization": quantization, **{name: _version(name) for name in LIBRARIES}}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def passed(check_key: str) -> list[float] | None:
    """The relative errors of the check that passed under `check_key`, or None (never checked, or unreadable)."""
    entry = _read().get(check_key)
    errors = entry.get("errors") if isinstance(entry, dict) else None
    if not isinstance(errors, list) or not all(isinstance(e, (int, float)) for e in errors):
        return None
    return [float(e) for e in errors]


def remember(check_key: str, errors: list[float]) -> None:
    """Add a passed check, keeping the newest KEPT; best effort: a folder that cannot be written means checking
    again next time."""
    entries = {k: v for k, v in _read().items() if isinstance(v, dict)}
    entries[check_key] = {"errors": [float(e) for e in errors], "at": round(time.time())}
    newest = dict(sorted(entries.items(), key=lambda item: item[1].get("at", 0))[-KEPT:])
    from ...server.registry import write_private

    try:
        write_private(checks_file(), json.dumps(newest))
    except OSError:
        pass


def _read() -> dict:
    try:
        found = json.loads(checks_file().read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
