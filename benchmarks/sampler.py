"""Where a process's threads spend their time: every thread's Python stack sampled every few milliseconds, in
process (no ptrace, which the GPU machine does not allow), summarized per thread kind into a JSON file.

    python -P benchmarks/sampler.py OUT.json -m qwen2vl_cli serve ...    # a command, sampled
    from benchmarks.sampler import start; start("OUT.json")              # this process, from here on

For each thread kind (name without its number): samples, the functions on top of its stack ("self": where it
is) and on its stack at all ("total"), as shares of its samples. The sampler's own lag (how late it woke up
beyond its interval) measures how long threads wait for the GIL.
"""

from __future__ import annotations

import atexit
import collections
import json
import re
import runpy
import sys
import threading
import time

INTERVAL_S = 0.005
TOP = 25


def _where(frame) -> str:
    code = frame.f_code
    return f"{'/'.join(code.co_filename.split('/')[-2:])}:{code.co_name}"


def start(path: str, interval_s: float = INTERVAL_S) -> None:
    own: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    total: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    samples: collections.Counter = collections.Counter()
    lags: list[float] = []
    me = threading.get_ident
    lock = threading.Lock()

    def sample() -> None:
        mine, names, last = me(), {}, time.perf_counter()
        while True:
            time.sleep(interval_s)
            now = time.perf_counter()
            lags.append(now - last - interval_s)
            last = now
            names.update({t.ident: re.sub(r"[-_ ]?\d+$", "", t.name) for t in threading.enumerate()})
            with lock:
                for ident, frame in sys._current_frames().items():
                    kind = names.get(ident, "?")
                    if ident == mine or kind == "sampler":
                        continue
                    samples[kind] += 1
                    own[kind][_where(frame)] += 1
                    seen = set()
                    while frame is not None:
                        seen.add(_where(frame))
                        frame = frame.f_back
                    total[kind].update(seen)

    def dump() -> None:
        with lock:
            report = {"interval_ms": interval_s * 1000, "samples": len(lags),
                      "sampler_lag_ms": {"mean": round(1000 * sum(lags) / max(1, len(lags)), 2),
                                         "p90": round(1000 * sorted(lags)[int(0.9 * len(lags))], 2) if lags else 0},
                      "threads": {}}
            for kind, count in samples.most_common():
                report["threads"][kind] = {
                    "samples": count,
                    "self": {k: round(v / count, 3) for k, v in own[kind].most_common(TOP)},
                    "total": {k: round(v / count, 3) for k, v in total[kind].most_common(TOP)}}
        with open(path, "w") as out:
            json.dump(report, out, indent=1)

    def every_few_seconds() -> None:
        while True:
            time.sleep(3)
            dump()

    threading.Thread(target=sample, name="sampler", daemon=True).start()
    threading.Thread(target=every_few_seconds, name="sampler", daemon=True).start()
    atexit.register(dump)


if __name__ == "__main__":
    out, flag, module, *rest = sys.argv[1:]
    assert flag == "-m", "usage: sampler.py OUT.json -m MODULE ARGS..."
    start(out)
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
