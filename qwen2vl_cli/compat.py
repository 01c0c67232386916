"""Every place qwen2vl leans on another library's private internals, each with the versions it was checked
against; everything else uses public API. Each says what happens where the internal is gone, and
`tests/test_compat.py` fails on an installed version that lacks one (so an upgrade that drops it is seen, not
silently slower or unguarded). Nothing here is imported until a command needs it.

Checked against: transformers 5.17 and 5.24 (the ends of the range pyproject allows), qwen-vl-utils 0.0.14, httpx
0.29 with httpcore 1.0.9 (the CPU suite's).
"""

from __future__ import annotations

from typing import Any, Callable


def after_image_processing(processor, hook: Callable[[Any], None]) -> bool:
    """Call `hook(image_inputs)` whenever `processor(...)` has processed a call's images, before it tokenizes
    the text (transformers' `ProcessorMixin._process_images`). False where that method is gone: no hook, and
    the caller treats a call as one step (the engine then holds its tokenizer lock throughout)."""
    process = getattr(processor, "_process_images", None)
    if process is None:
        return False

    def processed(*args, **kwargs):
        result = process(*args, **kwargs)
        hook(result[0])
        return result

    processor._process_images = processed
    return True


def transport_through(network_backend):
    """An httpx transport whose every connection (redirects included) is made by `network_backend` (an httpcore
    backend): httpx takes none, so its connection pool is replaced, keeping its TLS context
    (`HTTPTransport._pool`, `ConnectionPool._ssl_context`). Where those are gone this raises AttributeError: a
    server that fetches URLs must not fetch them unvetted."""
    import httpcore
    import httpx

    transport = httpx.HTTPTransport()
    transport._pool = httpcore.ConnectionPool(ssl_context=transport._pool._ssl_context,
                                              network_backend=network_backend)
    return transport


def video_readers() -> dict[str, Callable]:
    """qwen-vl-utils' own decord and torchcodec readers (`vision_process._read_video_decord`,
    `_read_video_torchcodec`: ele -> (frames, metadata, sample fps)); one that is gone is left out (PyAV, ours,
    still reads)."""
    from qwen_vl_utils import vision_process

    names = {"decord": "_read_video_decord", "torchcodec": "_read_video_torchcodec"}
    return {name: getattr(vision_process, attr) for name, attr in names.items() if hasattr(vision_process, attr)}


def attn_implementation(config) -> str | None:
    """The attention kernel a loaded model runs (`PretrainedConfig._attn_implementation`: transformers resolves
    "sdpa", "flash_attention_2", ... into it at load)."""
    return getattr(config, "_attn_implementation", None)
