"""The second one-liner through a session (issue 15's "every later one-liner"): what a request that comes soon after a
session's first answer waits for. A session's engine (in process, `serving` as `qwen2vl serve` sets it) answers a
first 1230-token photo, then, each of `--gaps` seconds after that answer's end (a one-liner's process exits and the next
starts in ~0.3 s), a second one; then a third once the engine has been idle for 3 s. Each graph capture (prompt
graphs: prefill.Prefill._capture; decode graphs: decoder.Rows._capture) is logged with its start and length,
beside each request's submit, first token and end, on one clock.

    python benchmarks/second.py --out R.json [--checkpoint DIR] [--gaps 0.3,1.0]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoint")
    parser.add_argument("--gaps", default="0.3,1.0", help="seconds between the first answer's end and the second")
    args = parser.parse_args()
    import torch

    from benchmarks.gpu import MAX_PIXELS, NEW_TOKENS, checkpoint_at, make_photos
    from qwen2vl_cli.engine.fast import decoder, prefill
    from qwen2vl_cli.engine.session import ModelSession
    from qwen2vl_cli.sources import ImageOptions, resolve_image
    from qwen2vl_cli.types import ChatRequest, Completion, GenerationOptions, Media, ModelSpec

    work = Path(tempfile.mkdtemp(prefix="qwen2vl-second-"))
    checkpoint = checkpoint_at(args.checkpoint, work)
    photos = [str(p) for p in make_photos(work / "photos", 1)]
    origin = time.perf_counter()
    events: list[dict] = []

    def logged(kind, original):
        def wrapper(self, key, *rest):
            begin = time.perf_counter()
            try:
                return original(self, key, *rest)
            finally:
                torch.cuda.synchronize()
                events.append({"capture": kind, "key": str(key)[:60], "at_s": round(begin - origin, 3),
                               "took_ms": round((time.perf_counter() - begin) * 1000, 1)})
        return wrapper

    prefill.Prefill._capture = logged("prompt", prefill.Prefill._capture)
    decoder.Rows._capture = logged("decode", decoder.Rows._capture)
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": torch.cuda.get_device_name(0)}
    for gap in [float(g) for g in args.gaps.split(",")]:
        session = ModelSession(ModelSpec(model=checkpoint, device="cuda", dtype="bfloat16", attn="sdpa")).load()
        session.engine.serving = True
        image = resolve_image(photos[0], ImageOptions(max_pixels=MAX_PIXELS))
        events.clear()
        origin = time.perf_counter()

        def ask(name: str) -> None:
            request = ChatRequest("Describe this image.", [Media("image", photos[0], image)],
                                  generation=GenerationOptions(max_new_tokens=NEW_TOKENS))
            sent = time.perf_counter()
            first = None
            for event in session.stream(request):
                if first is None:
                    first = time.perf_counter()
                if isinstance(event, Completion):
                    break
            end = time.perf_counter()
            events.append({"request": name, "at_s": round(sent - origin, 3), "first_token_ms": round((first - sent) * 1000, 1),
                           "total_ms": round((end - sent) * 1000, 1)})

        ask("first")
        time.sleep(gap)
        ask("second")
        time.sleep(3)
        ask("third (after 3 s idle)")
        report[f"gap_{gap}s"] = sorted(events, key=lambda e: e["at_s"])
        print(json.dumps(report[f"gap_{gap}s"], indent=1), flush=True)
        session.engine.close(wait_s=10)
        session.unload()
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
