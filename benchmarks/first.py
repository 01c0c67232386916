"""Where a fresh process's first answer goes: the engine thread under cProfile (a 1230-token photo, 128 tokens),
then answers of a new image size, the same again, and a third size, each timed (first token, whole answer).
Run it twice with one QWEN2VL_STATE_DIR (the first process runs the fast path's check, the second is the measure),
and beside the tree before (a copy of this file in that tree) to compare:

    python benchmarks/first.py CHECKPOINT OUT_PREFIX    # OUT_PREFIX.prof, OUT_PREFIX.txt
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch  # noqa: F401 - before the load, as in the measurements committed (its phases then exclude torch)

    from benchmarks.gpu import MAX_PIXELS, make_photos
    from qwen2vl_cli.engine import scheduler
    from qwen2vl_cli.engine.session import ModelSession
    from qwen2vl_cli.sources import ImageOptions, resolve_image
    from qwen2vl_cli.types import ChatRequest, GenerationOptions, Media, ModelSpec

    checkpoint, out = sys.argv[1], sys.argv[2]
    original = scheduler.Engine._run

    def profiled(self) -> None:  # the first engine thread's work, under cProfile
        profile = cProfile.Profile()
        profile.enable()
        try:
            original(self)
        finally:
            profile.disable()
            profile.dump_stats(out + ".prof")

    scheduler.Engine._run = profiled
    photos = [str(p) for p in make_photos(Path("/tmp/fp-photos"), 2)]
    session = ModelSession(ModelSpec(model=checkpoint, device="cuda", dtype="bfloat16", attn="sdpa")).load()

    def ask(path: str, pixels: int) -> dict:
        image = resolve_image(path, ImageOptions(max_pixels=pixels))
        request = ChatRequest("Describe this image.", [Media("image", path, image)],
                              generation=GenerationOptions(max_new_tokens=128))
        sent, first = time.perf_counter(), None
        for _ in session.stream(request):
            first = first or time.perf_counter()
        return {"first_token_ms": round((first - sent) * 1000, 1),
                "total_ms": round((time.perf_counter() - sent) * 1000, 1)}

    report = {"load": session.phases, "first": ask(photos[0], MAX_PIXELS)}
    session.engine.close(wait_s=10)  # the profiled thread ends; the next requests get a plain one
    scheduler.Engine._run = original
    session._engine = None
    report["new size"] = ask(photos[1], 1000 * 28 * 28)
    report["same again"] = ask(photos[1], 1000 * 28 * 28)
    report["third size"] = ask(photos[0], 800 * 28 * 28)
    stream = io.StringIO()
    stats = pstats.Stats(out + ".prof", stream=stream)
    stats.sort_stats("cumulative").print_stats(45)
    stats.sort_stats("tottime").print_stats(25)
    Path(out + ".txt").write_text(json.dumps(report) + "\n" + stream.getvalue())
    print(json.dumps(report))


if __name__ == "__main__":
    main()
