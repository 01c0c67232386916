"""The engine's continuous batching (engine/scheduler.py over fast/decoder.Rows), run on the CPU in float32 with
the fast path forced on: whatever shares the batch, whenever a request joins or leaves it, each answer is the
seed recipe's (transformers' generate on that request alone)."""

from __future__ import annotations

import os
import queue
import threading
import time

import pytest

from .conftest import noise_image

CASES = [  # (images, prompt, max new tokens, streamed)
    (["a"], "Describe this image.", 24, True),
    (["b"], "What is here?", 5, False),
    (["c"], "Count the colours.", 14, True),
    ([], "Write a poem about rain.", 9, False),
    (["a"], "Colours?", 3, True),
    (["b", "c"], "Compare them.", 12, False),
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine-images")
    out = {}
    for name, (w, h, seed) in {"a": (84, 56, 11), "b": (56, 84, 12), "c": (112, 56, 13)}.items():
        out[name] = folder / f"{name}.png"
        noise_image(w, h, seed).save(out[name])
    return out


def recipe(tiny_model, paths, cases) -> list[str]:
    """The seed recipe's answer to each case, alone: apply_chat_template + process_vision_info + generate."""
    from qwen_vl_utils import process_vision_info
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_model)
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model)
    answers = []
    for names, prompt, new, _ in cases:
        messages = [{"role": "user", "content": [*({"type": "image", "image": f"file://{paths[n]}"} for n in names),
                                                 {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        images, videos = process_vision_info(messages)
        inputs = processor(text=[text], images=images, videos=videos, return_tensors="pt")
        ids = model.generate(**inputs, max_new_tokens=new, do_sample=False)[0, inputs.input_ids.shape[1]:]
        answers.append(processor.decode(ids, skip_special_tokens=True))
    return answers


@pytest.fixture(scope="module")
def reference(tiny_model, paths):
    answers = recipe(tiny_model, paths, CASES)
    assert len(set(answers)) == len(answers), "the cases should have different answers: the test can fail"
    return answers


@pytest.fixture()
def session(tiny_model):
    """A session with the fast path on (decided at load), its own engine."""
    from qwen2vl_cli.engine.session import ModelSession
    from qwen2vl_cli.types import ModelSpec

    os.environ["QWEN2VL_FASTPATH"] = "on"
    try:
        loaded = ModelSession(ModelSpec(model=str(tiny_model), device="cpu", dtype="float32")).load()
    finally:
        del os.environ["QWEN2VL_FASTPATH"]
    assert loaded.fast, "the fast path's check failed"
    yield loaded
    loaded.engine.close(wait_s=10)


def request_for(session, paths, case, **options):
    from qwen2vl_cli.sources import read_image
    from qwen2vl_cli.types import ChatRequest, GenerationOptions

    names, prompt, new, _ = case
    media = [session.image_media(read_image(str(paths[n]))) for n in names]
    return ChatRequest(prompt, media, generation=GenerationOptions(max_new_tokens=new, **options))


class Collector:
    """Events of several submitted requests, by index."""

    def __init__(self) -> None:
        self.events: queue.Queue = queue.Queue()
        self.deltas: dict[int, list[str]] = {}
        self.first_delta = threading.Event()

    def emit(self, index: int):
        def put(event) -> None:
            from qwen2vl_cli.types import TextDelta

            if isinstance(event, TextDelta):
                self.deltas.setdefault(index, []).append(event.text)
                self.first_delta.set()
            else:
                self.events.put((index, event))
        return put

    def wait(self, count: int, timeout: float = 120) -> dict:
        results = {}
        for _ in range(count):
            index, event = self.events.get(timeout=timeout)
            if isinstance(event, BaseException):
                raise event
            results[index] = event
        return results


def watch_joins(monkeypatch) -> list[tuple[int, int]]:
    """(rows in use before, rows joining) for every join into the running batch."""
    from qwen2vl_cli.engine.fast.decoder import Rows

    joins: list[tuple[int, int]] = []
    original = Rows.join

    def join(self, prompt_kv, attention, *args):
        joins.append((self.count, attention.shape[0]))
        return original(self, prompt_kv, attention, *args)

    monkeypatch.setattr(Rows, "join", join)
    return joins


def test_requests_join_and_leave_the_running_batch_with_the_seed_recipes_answers(session, paths, reference,
                                                                                 monkeypatch):
    """Two rows for six requests of different lengths: the later ones join as rows free up, one arrives while
    the first is decoding; streamed and non-streamed share the batch; every answer is the recipe's."""
    joins = watch_joins(monkeypatch)
    session.engine.max_rows = 2
    collector = Collector()
    requests = [request_for(session, paths, case) for case in CASES]
    session.engine.submit(requests[0], collector.emit(0), stream=CASES[0][3])
    assert collector.first_delta.wait(60)  # the first is decoding now
    for index in range(1, len(CASES)):
        session.engine.submit(requests[index], collector.emit(index), stream=CASES[index][3])
    results = collector.wait(len(CASES))
    assert [results[i].text for i in range(len(CASES))] == reference
    for index, (_, _, new, streamed) in enumerate(CASES):
        assert results[index].completion_tokens <= new
        assert ("".join(collector.deltas.get(index, [])) == reference[index]) if streamed else index not in collector.deltas
    timings = session.engine.timings_ms()  # what /health reports: where a request's first token waited
    assert timings["requests"] == len(CASES) and all(timings[k] >= 0 for k in ("prepare", "wait", "prefill"))
    assert max(before + joining for before, joining in joins) <= 2
    assert any(before > 0 for before, _ in joins), "no request joined a batch that was running"
    assert session.engine.rows.count == 0 and not any(session.engine.live)


def test_a_running_stream_decodes_while_a_queue_is_prefilled(session, paths, reference, monkeypatch):
    """Prefills are interleaved with decode steps (PREFILL_TOKENS between two steps at most; here one request's
    worth): a stream already answering gets tokens between the joins of requests queued together, and every
    answer is the recipe's."""
    from qwen2vl_cli.engine.fast.decoder import Rows

    engine = session.engine
    engine.prefill_limit = 1  # a group of one: the first waiting request is always admitted
    collector = Collector()
    running = engine.submit(request_for(session, paths, (["c"], "Tell me everything.", 400, True)),
                            collector.emit(9), stream=True)
    assert collector.first_delta.wait(60)
    seen: list[int] = []  # the running stream's tokens at each join after its own
    original = Rows.join

    def join(self, *args):
        seen.append(len(running.answer.ids))
        return original(self, *args)

    monkeypatch.setattr(Rows, "join", join)
    for index in range(1, 5):
        engine.submit(request_for(session, paths, CASES[index]), collector.emit(index), stream=CASES[index][3])
    results = collector.wait(4)
    running.cancel()
    assert running.closed.wait(30)
    assert [results[i].text for i in range(1, 5)] == reference[1:5]
    assert len(seen) == 4 and seen == sorted(set(seen)), f"no decode step between the joins: {seen}"


def test_stop_strings_and_cancelled_requests_free_their_rows(session, paths, reference):
    """A stop string ends its own row (text cut before it), a cancelled stream frees its row at once, and the
    requests beside them answer as alone."""
    from qwen2vl_cli.types import Completion

    stop = reference[0][6:10]
    collector = Collector()
    engine = session.engine
    engine.submit(request_for(session, paths, CASES[0], stop=(stop,)), collector.emit(0), stream=True)
    long = engine.submit(request_for(session, paths, (["c"], "Tell me everything.", 400, True)), collector.emit(9),
                         stream=True)
    engine.submit(request_for(session, paths, CASES[2]), collector.emit(2), stream=False)
    results = collector.wait(2)
    long.cancel()
    assert long.closed.wait(30)
    assert results[0].text == reference[0][:reference[0].index(stop)] and results[0].finish_reason == "stop"
    assert "".join(collector.deltas[0]) == results[0].text
    assert results[2].text == reference[2]
    assert collector.events.empty()  # the cancelled one gets no Completion
    after = list(engine.stream(request_for(session, paths, CASES[4])))
    assert isinstance(after[-1], Completion) and after[-1].text == reference[4]
    assert engine.rows.count == 0


def test_a_prefill_out_of_memory_is_split_and_retried(session, paths, reference, monkeypatch):
    """One failure policy: a prefill that runs out of memory after others of its group joined the batch is
    retried with fewer (the rest wait for the next round); no request is lost."""
    import torch

    fast, engine = session.fast, session.engine
    original = fast._prefill
    failures: list[int] = []

    def prefill(inputs, host=None):
        # a part of the group joined the batch and its first token is not read yet: this prefill is not the first
        if any(t is not None and not t.answer.ids for t in engine.live):
            failures.append(engine.prefill_limit)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(inputs, host)

    monkeypatch.setattr(fast, "_prefill", prefill)
    answers = session.generate_batch([request_for(session, paths, case) for case in CASES])
    assert [a.text for a in answers] == reference
    assert failures, "no group was prefilled together: the test did not test the policy"
    assert engine.prefill_limit < failures[0]  # smaller after the failure


def test_sampled_requests_beside_greedy_ones(session, paths, reference):
    """Sampling is answered by transformers' generate on the engine's thread; greedy answers beside it do not
    change, and a seeded sample is repeatable."""
    collector = Collector()
    engine = session.engine
    for index in (0, 2):
        engine.submit(request_for(session, paths, CASES[index]), collector.emit(index), stream=True)
    engine.submit(request_for(session, paths, CASES[1], temperature=0.8, seed=5), collector.emit(1))
    results = collector.wait(3)
    assert results[0].text == reference[0] and results[2].text == reference[2]
    again = session.generate_batch([request_for(session, paths, CASES[1], temperature=0.8, seed=5)])[0]
    assert again.text == results[1].text and results[1].completion_tokens > 0


def test_the_running_batch_grows_for_a_longer_request(session, paths, tiny_model, monkeypatch):
    """A request longer than the cache's rows arrives while another decodes: the rows are copied into longer
    ones (and more of them) between steps, and both answers are generate's."""
    from qwen2vl_cli.engine import scheduler
    from qwen2vl_cli.engine.session import ModelSession
    from qwen2vl_cli.types import ModelSpec

    monkeypatch.setattr(scheduler, "MIN_CACHE", 256)
    resized: list[int] = []  # rows in use at each resize
    original = scheduler.Engine._resize
    monkeypatch.setattr(scheduler.Engine, "_resize", lambda self, *a: resized.append(
        self.rows.count if self.rows else 0) or original(self, *a))
    cases = [(["a"], "Describe this image at length.", 160, True), ([], "Count slowly to a thousand.", 400, False)]
    stock = ModelSession(ModelSpec(model=str(tiny_model), device="cpu", dtype="float32")).load()
    expected = [stock.generate_batch([request_for(stock, paths, case)])[0].text for case in cases]
    collector = Collector()
    session.engine.submit(request_for(session, paths, cases[0]), collector.emit(0), stream=True)
    assert collector.first_delta.wait(60)
    session.engine.submit(request_for(session, paths, cases[1]), collector.emit(1), stream=False)
    results = collector.wait(2)
    assert [results[0].text, results[1].text] == expected
    assert session.engine.rows.size >= 512 and session.engine.rows.capacity >= 2
    assert any(count > 0 for count in resized), "the batch was not resized while a request was decoding"


def test_a_failing_request_fails_alone(session, paths, reference):
    """A request that cannot be answered (over the model's context) is refused to its caller alone, whether it
    is prepared on the engine's thread or beside a running batch; the others answer as alone."""
    from qwen2vl_cli.errors import UsageError

    collector = Collector()
    engine = session.engine
    engine.submit(request_for(session, paths, CASES[0]), collector.emit(0), stream=True)
    assert collector.first_delta.wait(60)
    too_long = request_for(session, paths, (["a"], "Go on forever.", 10**6, False))
    engine.submit(too_long, collector.emit(7))
    engine.submit(request_for(session, paths, CASES[2]), collector.emit(2))
    results = {}
    for _ in range(3):
        index, event = collector.events.get(timeout=120)
        results[index] = event
    assert isinstance(results[7], UsageError) and "context" in str(results[7])
    assert results[0].text == reference[0] and results[2].text == reference[2]


def test_answers_decode_while_other_threads_tokenize(session, paths):
    """session.decode shares the processor's tokenizer (no copy, no lock) while prompts are tokenized (padded and
    not, under the session's lock) on other threads: every decode gives the text it gives alone, nothing raises."""
    import sys
    import time

    if getattr(sys, "_is_gil_enabled", lambda: True)():
        assert session.detokenizer is session.processor.tokenizer  # no copy (a free-threaded Python gets one)
    requests = [request_for(session, paths, case) for case in CASES]
    ids = session.processor.tokenizer("A red bus by a river, in the evening light. " * 30)["input_ids"]
    expected = {n: session.decode(ids[:n]) for n in range(1, len(ids), 7)}
    errors: list[BaseException] = []
    stop = time.monotonic() + 3
    counts = {"tokenized": 0, "decoded": 0}

    def tokenize(offset: int) -> None:
        for turn in range(10 ** 9):
            if time.monotonic() > stop or errors:
                return
            try:  # a padded batch, then one prompt unpadded: the tokenizer's settings change every turn
                chosen = [requests[(offset + turn) % len(requests)], requests[(offset + turn + 1) % len(requests)]]
                session.prepare(chosen) if turn % 2 else session.prompt_tokens(chosen[0])
                counts["tokenized"] += 1
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

    def decode() -> None:
        while time.monotonic() < stop and not errors:
            for n, text in expected.items():
                try:
                    assert session.decode(ids[:n]) == text
                    counts["decoded"] += 1
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)
                    return

    threads = [threading.Thread(target=tokenize, args=(k,)) for k in range(2)]
    threads += [threading.Thread(target=decode) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    assert counts["tokenized"] > 4 and counts["decoded"] > 1000, counts


def test_images_are_processed_side_by_side_and_only_tokenizing_holds_the_lock(session, paths, monkeypatch):
    """Four threads prepare image requests at once: their image processing overlaps (each is made to take 0.2 s),
    every tokenizer call runs holding the session's lock, one at a time, and each prepared batch equals the
    one made alone."""
    import time

    requests = [request_for(session, paths, case) for case in CASES if case[0]]
    alone = [session.prepare([r]) for r in requests]
    state = {"images": 0, "most_images": 0, "tokenizing": 0, "unlocked": 0}
    guard = threading.Lock()
    process = session.processor._process_images  # the session's hook around transformers' own (compat.py)

    def slow_images(*args, **kwargs):
        with guard:
            state["images"] += 1
            state["most_images"] = max(state["most_images"], state["images"])
        time.sleep(0.2)
        try:
            return process(*args, **kwargs)
        finally:
            with guard:
                state["images"] -= 1

    tokenizer_type = type(session.processor.tokenizer)
    tokenize = tokenizer_type.__call__

    def watched(self, *args, **kwargs):
        if not session.tokenizer_lock.locked():
            state["unlocked"] += 1
        state["tokenizing"] += 1
        try:
            assert state["tokenizing"] == 1, "two threads tokenized at once"
            return tokenize(self, *args, **kwargs)
        finally:
            state["tokenizing"] -= 1

    monkeypatch.setattr(session.processor, "_process_images", slow_images)
    monkeypatch.setattr(tokenizer_type, "__call__", watched)
    results: list = [None] * len(requests)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, session.prepare([requests[i]])))
               for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert state["most_images"] > 1, "the images were processed one call at a time"
    assert state["unlocked"] == 0
    for made, expected in zip(results, alone):
        assert made.keys() == expected.keys()
        for key in expected:
            assert (made[key] == expected[key]).all(), key


def test_a_load_pauses_the_collector_and_an_unload_frees_what_it_froze(session, tmp_path):
    """A load runs without cyclic collections and freezes what it made (engine/session.collector_paused); the
    collector is on again after it, loaded or failed, and an unload (the server's --keep-alive) still frees the
    model, whose layers' bound forwards make reference cycles that only the collector can break."""
    import gc
    import weakref

    from qwen2vl_cli.engine.session import ModelSession
    from qwen2vl_cli.errors import ModelLoadError
    from qwen2vl_cli.types import ModelSpec

    assert gc.isenabled() and gc.get_freeze_count() > 0
    layer = weakref.ref(session.model.model.language_model.layers[0])  # in a cycle: its bound fast forward
    session.unload()
    assert layer() is None, "the unloaded model's layers are still held"
    with pytest.raises(ModelLoadError):
        ModelSession(ModelSpec(model=str(tmp_path / "missing"), device="cpu", dtype="float32")).load()
    assert gc.isenabled()


def test_first_tokens_are_read_before_a_decode_graph_is_captured(session, paths, reference, monkeypatch):
    """A step at a new row count captures its CUDA graph first (tens of ms, hundreds in a new process): the first
    tokens the prefill made are read (and streamed) before it, not after. Captures are simulated on the CPU."""
    from qwen2vl_cli.engine.fast.decoder import Rows

    captured: dict = {}  # row count -> tokens its request had been given when the capture began

    def will_capture(self):
        return self.bucket() not in captured

    def capture(self, bucket):
        captured[bucket] = len(session.engine.live[0].answer.ids)

    monkeypatch.setattr(Rows, "will_capture", will_capture)
    monkeypatch.setattr(Rows, "_capture", capture)
    completion = session.generate_batch([request_for(session, paths, CASES[0])])[0]
    assert completion.text == reference[0]
    assert captured == {1: 1}, captured


@pytest.mark.parametrize("passes", [1, 0])
def test_a_streamed_request_goes_ahead_of_waiting_non_streamed_ones(session, paths, reference, monkeypatch, passes):
    """Someone watching an answer come (a streamed one-liner) is not kept behind a batch's queue: a streamed request
    is prefilled ahead of the non-streamed ones waiting, unless they have been passed PASSES times already (none waits
    for long). One row, so the order they are admitted in is the order they are answered in; every answer is the
    recipe's."""
    from qwen2vl_cli.engine import scheduler

    monkeypatch.setattr(scheduler, "PASSES", passes)
    engine = session.engine
    engine.max_rows = 1
    hold = threading.Event()
    hold.set()
    admit = engine._admit
    monkeypatch.setattr(engine, "_admit", lambda: None if hold.is_set() else admit())

    def waiting(count: int) -> None:
        deadline = time.monotonic() + 60
        while len(engine.waiting) < count:
            assert time.monotonic() < deadline, "the requests were not prepared"
            time.sleep(0.01)

    collector = Collector()
    for count, index in enumerate([1, 3, 2], start=1):  # non-streamed, non-streamed, then streamed
        assert CASES[index][3] == (index == 2)
        engine.submit(request_for(session, paths, CASES[index]), collector.emit(index), stream=CASES[index][3])
        waiting(count)
    hold.clear()
    done = []
    for _ in range(3):
        index, event = collector.events.get(timeout=120)
        assert not isinstance(event, BaseException), event
        assert event.text == reference[index]
        done.append(index)
    assert done == ([2, 1, 3] if passes else [1, 3, 2])


def test_the_queue_lets_streams_pass_a_non_streamed_request_a_bounded_number_of_times(monkeypatch):
    """The waiting queue's order, however old it is: a stream goes behind the streams already waiting and ahead of
    the non-streamed requests after them, each of which lets PASSES streams by at most; a request the fast path does
    not serve (answered by `generate`) is not passed, nor is anything ahead of it."""
    from qwen2vl_cli.engine import scheduler
    from qwen2vl_cli.engine.tickets import Ticket

    monkeypatch.setattr(scheduler, "PASSES", 2)
    engine = scheduler.Engine(session=None)

    def queue(name: str, stream: bool = False, fast: bool = True) -> None:
        ticket = Ticket(name, emit=None, stream=stream)
        ticket.fast, ticket.prepared_at = fast, 0.0  # prepared long ago: age does not matter
        engine._queue(ticket)

    def order() -> str:
        return " ".join(ticket.request for ticket in engine.waiting)

    for name in ("a", "b", "c"):
        queue(name)
    queue("S1", stream=True)
    assert order() == "S1 a b c"
    queue("S2", stream=True)
    assert order() == "S1 S2 a b c"  # behind the stream before it; a, b and c have been passed twice
    queue("d")
    queue("S3", stream=True)
    assert order() == "S1 S2 a b c S3 d"
    queue("S4", stream=True)
    assert order() == "S1 S2 a b c S3 S4 d"
    queue("S5", stream=True)
    assert order() == "S1 S2 a b c S3 S4 d S5"
    queue("g", fast=False)
    queue("e")
    queue("S6", stream=True)
    assert order() == "S1 S2 a b c S3 S4 d S5 g S6 e"  # the `generate` request is not passed
    queue("f")
    assert order() == "S1 S2 a b c S3 S4 d S5 g S6 e f"
    assert [t.passed for t in engine.waiting if not t.stream] == [2, 2, 2, 2, 0, 1, 0]


def test_an_answer_cut_inside_a_character_leaves_that_character_out(session, paths, tiny_model):
    """An answer that reaches its max tokens in the middle of a character's bytes: the seed recipe's decode ends in
    U+FFFD there; ours (streamed and not, in one running batch) is that text without it, as vLLM answers
    (tests/test_vllm.py), and all its tokens are counted."""
    cases = [(["b"], "What is here?", 14, True), (["a"], "Colours?", 11, False)]
    expected = recipe(tiny_model, paths, cases)
    assert all(text.endswith("\ufffd") for text in expected), "the cases should end inside a character"
    collector = Collector()
    for index, case in enumerate(cases):
        session.engine.submit(request_for(session, paths, case), collector.emit(index), stream=case[3])
    results = collector.wait(len(cases))
    for index, (case, text) in enumerate(zip(cases, expected)):
        answer = results[index]
        assert answer.text == text.rstrip("\ufffd") and answer.text
        assert answer.completion_tokens == case[2] and answer.finish_reason == "length"
    assert "".join(collector.deltas[0]) == results[0].text


def test_only_an_unfinished_last_character_is_left_out_and_a_long_run_costs_no_more(session):
    """A character's bytes span at most 3 tokens: up to those the text is the last whole one's; a model repeating a
    stray byte 20,000 times keeps its text (less the last U+FFFD) and does not decode every prefix of it."""
    tokenizer = session.processor.tokenizer
    ids = tokenizer.encode("A llama 🦙 and")
    stray = next(i for i in ids if session.decode([i]).endswith("\ufffd"))  # the emoji's first bytes, after a space
    for count in (1, 2, 3):
        assert session.whole_text(ids + [stray] * count) == "A llama 🦙 and"
    start = time.perf_counter()
    text = session.whole_text(ids + [stray] * 20000)
    assert time.perf_counter() - start < 2 and text.startswith("A llama 🦙 and \ufffd") and not text.endswith("\ufffd")


def test_a_stream_through_a_long_run_of_stray_bytes_decodes_a_bounded_window_and_ends_as_its_completion(session):
    """A streamed answer whose text ends in U+FFFD for thousands of tokens (a model repeating a stray byte) decodes a
    few tokens a step, not the whole run each step (quadratic on the engine's thread), and what it streams is its
    Completion's text, with the run in the middle of the answer and at its end."""
    from types import SimpleNamespace

    from qwen2vl_cli.engine.tickets import Answer
    from qwen2vl_cli.types import ChatRequest, GenerationOptions, TextDelta

    tokenizer = session.processor.tokenizer
    head, tail = tokenizer.encode("A llama 🦙 and"), tokenizer.encode(" 中文 done.")
    stray = next(i for i in head if session.decode([i]).endswith("\ufffd"))
    decode, decoded = session.decode, []
    session.decode = lambda ids: decoded.append(len(ids)) or decode(ids)
    try:
        for ids in (head + [stray] * 3000 + tail, head + [stray] * 3000, head + [stray] * 3000 + tail[:2]):
            out: list = []
            ticket = SimpleNamespace(request=ChatRequest("x", generation=GenerationOptions(max_new_tokens=len(ids))),
                                     stream=True, emit=out.append, submitted=time.perf_counter(), prompt_tokens=1)
            answer, decoded[:] = Answer(session, ticket), []
            for token in ids:
                answer.add(token)
            completion = answer.finish()
            assert sum(decoded) < 40 * len(ids), "each step decoded the whole run"
            streamed = "".join(piece.text for piece in out if isinstance(piece, TextDelta))
            assert streamed == completion.text == session.whole_text(ids)
            assert streamed.startswith("A llama 🦙 and \ufffd")
    finally:
        session.decode = decode
