"""The fast path's pieces against HF's own modules (on the CPU; the GPU's Triton kernels are checked against
these same torch versions by `benchmarks/gpu.py --check-kernels`)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers.activations import ACT2FN
from transformers.models.qwen2_vl import modeling_qwen2_vl as stock

from qwen2vl_cli.engine.fast import kernels

from .conftest import break_the_fast_layers_cache, noise_image


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_references_are_hfs_arithmetic(dtype):
    """Bit for bit: each torch version rounds where HF's modules round."""
    torch.manual_seed(1)
    hidden, delta = torch.randn(3, 5, 64, dtype=dtype), torch.randn(3, 5, 64, dtype=dtype)
    norm = stock.Qwen2VLRMSNorm(64, eps=1e-6).to(dtype)
    norm.weight.data = (1 + 0.1 * torch.randn(64)).to(dtype)
    total, normed = kernels.add_rms_norm_torch(hidden, delta, norm.weight, 1e-6)
    assert torch.equal(total, hidden + delta) and torch.equal(normed, norm(hidden + delta))

    gate_up = torch.randn(4, 2 * 48, dtype=dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(kernels.silu_mul_torch(gate_up), ACT2FN["silu"](gate) * up)

    x = torch.randn(4, 96, dtype=dtype) * 3
    assert torch.equal(kernels.quick_gelu_torch(x), ACT2FN["quick_gelu"](x))

    # prompt rotary: q/k/v split into heads, HF's apply_rotary_pos_emb
    heads, kv_heads, head_dim, length = 4, 2, 16, 7
    qkv = torch.randn(2, length, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    angles = torch.randn(2, length, head_dim // 2) * 50
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
    q, k, v = kernels.rope_prefill_torch(qkv, cos, sin, heads, kv_heads)
    split = lambda t, n: t.view(2, length, n, head_dim).transpose(1, 2)  # noqa: E731
    q_ref, k_ref = stock.apply_rotary_pos_emb(split(qkv[..., :64], heads), split(qkv[..., 64:96], kv_heads), cos, sin)
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref) and torch.equal(v, split(qkv[..., 96:], kv_heads))

    # vision rotary (float32 inside, as HF), laid out per image for one attention call
    seq, vheads, vdim = 12, 2, 16
    vqkv = torch.randn(seq, 3 * vheads * vdim, dtype=dtype)
    vangles = torch.randn(seq, vdim // 2) * 20
    vcos, vsin = torch.cat([vangles.cos()] * 2, -1), torch.cat([vangles.sin()] * 2, -1)
    q, k, v = kernels.vision_qkv_torch(vqkv, vcos, vsin, vheads, length=6)
    q_all, k_all, v_all = vqkv.reshape(seq, 3, vheads, vdim).permute(1, 0, 2, 3).unbind(0)
    q_ref, k_ref = stock.apply_rotary_pos_emb_vision(q_all, k_all, vcos, vsin)
    per_image = lambda t: t.reshape(2, 6, vheads, vdim).transpose(1, 2)  # noqa: E731
    assert torch.equal(q, per_image(q_ref)) and torch.equal(k, per_image(k_ref)) and torch.equal(v, per_image(v_all))


def test_fast_modules_keep_the_models_answers(tiny_model):
    """The patched vision tower and text layers: same logits (float32 rounding) and the same greedy answers,
    for a padded batch of images of different sizes, and for two images of one size (one attention call)."""
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from qwen2vl_cli.engine.fast.decoder import enable

    processor = AutoProcessor.from_pretrained(tiny_model)
    processor.tokenizer.padding_side = "left"
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    text = "<|vision_start|><|image_pad|><|vision_end|>"
    batches = [
        ([noise_image(84, 112, 1), noise_image(56, 56, 2)], [text + "What is this?", text + "Describe it in detail."]),
        ([noise_image(84, 56, 3), noise_image(84, 56, 4)], [text + "Compare.", text + "Compare."]),
    ]
    inputs = [processor(text=t, images=i, padding=True, return_tensors="pt") for i, t in batches]
    with torch.inference_mode():
        before = [(model(**x).logits, model.generate(**x, max_new_tokens=10, do_sample=False)) for x in inputs]
        enable(model)
        assert model.model.visual._qwen2vl_fast and model.model.language_model._qwen2vl_fast
        after = [(model(**x).logits, model.generate(**x, max_new_tokens=10, do_sample=False)) for x in inputs]
    for (logits, ids), (new_logits, new_ids) in zip(before, after):
        assert torch.allclose(logits, new_logits, rtol=1e-4, atol=1e-4 * logits.abs().max().item())
        assert torch.equal(ids, new_ids)
    assert not torch.equal(before[0][1][0], before[0][1][1])  # the two answers differ: the test can fail


def test_prefill_equals_the_models_forward(tiny_model):
    """One conversation's prefill (positions worked out on the CPU, image features put in place) gives the
    model forward's last logits, rope delta and keys/values: two images of different sizes, and text only.
    Padded at the end, as the text graphs pad a prompt to their length, it gives the same again."""
    from transformers import AutoProcessor, DynamicCache, Qwen2VLForConditionalGeneration

    from qwen2vl_cli.engine.fast.decoder import enable

    processor = AutoProcessor.from_pretrained(tiny_model)
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    decoder = enable(model)
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    cases = [processor(text=f"{image}and{image}Compare them.", images=[noise_image(84, 112, 5), noise_image(56, 56, 6)],
                       return_tensors="pt"),
             processor(text="Tell me a story.", return_tensors="pt")]
    assert decoder.prefill.supported and all(decoder.prefill.applies(x) for x in cases)
    close = lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())  # noqa: E731
    with torch.inference_mode():
        for inputs in cases:
            cache = DynamicCache(config=model.config)
            model.model.rope_deltas = None
            theirs = model(**inputs, use_cache=True, **{decoder.cache_arg: cache}).logits[:, -1]
            theirs_delta = model.model.rope_deltas if "pixel_values" in inputs else torch.zeros(1, 1, dtype=torch.long)
            ours, kv, delta = decoder.prefill.run(inputs)
            assert close(ours, theirs) and torch.equal(ours.argmax(-1), theirs.argmax(-1))
            assert torch.equal(delta, theirs_delta)
            for (keys, values), layer in zip(kv, cache.layers, strict=True):
                assert close(keys, layer.keys) and close(values, layer.values)

            length = inputs["input_ids"].shape[1]  # the prompt at the start of longer buffers
            hidden = model.model.language_model.embed_tokens(inputs["input_ids"])
            if "pixel_values" in inputs:
                features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
                hidden = hidden.masked_scatter(inputs["input_ids"][..., None] == model.config.image_token_id,
                                               torch.cat(features.pooler_output))
                positions, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                          image_grid_thw=inputs["image_grid_thw"])
            else:
                positions = torch.arange(length).view(1, 1, -1).expand(3, 1, -1)
            padded = torch.cat([hidden, torch.randn(1, 9, hidden.shape[-1])], dim=1)
            padded_positions = torch.cat([positions, torch.zeros(3, 1, 9, dtype=torch.long)], dim=-1)
            logits, padded_kv = decoder.prefill.text(padded, padded_positions, torch.tensor([length - 1]))
            assert close(logits, theirs)
            for (keys, values), layer in zip(padded_kv, cache.layers, strict=True):
                assert close(keys[:, :, :length], layer.keys) and close(values[:, :, :length], layer.values)
    assert not torch.equal(cases[0]["input_ids"][0, :4], cases[1]["input_ids"][0, :4])


def test_text_only_answer_after_an_image_equals_generate(tiny_model, monkeypatch):
    """A text-only prompt decodes from its own positions, not the previous image prompt's rope delta
    (a served session mixes the two), alone and in a padded batch."""
    from qwen2vl_cli.types import ChatRequest, GenerationOptions, Media, ModelSpec
    from qwen2vl_cli.engine.session import ModelSession

    session = ModelSession(ModelSpec(model=str(tiny_model), device="cpu", dtype="float32")).load()
    options = GenerationOptions(max_new_tokens=12)
    picture = ChatRequest("Describe.", [Media("image", "x", noise_image(112, 84, 7))], generation=options)
    texts = [ChatRequest("Tell me a story about a cat.", generation=options),
             ChatRequest("Why?", generation=options)]

    def answers(fast: str):
        monkeypatch.setenv("QWEN2VL_FASTPATH", fast)
        session.generate_batch([picture])
        return [c.text for c in session.generate_batch(texts[:1]) + session.generate_batch(texts)]

    assert answers("on") == answers("off")


def test_streamed_answer_starts_the_vision_tower_before_tokenizing(tiny_model, monkeypatch):
    """stream() runs the vision tower once, from the image processor's output (before the prompt is
    tokenized), and its answer is generate's."""
    from qwen2vl_cli.engine.fast.prefill import Prefill
    from qwen2vl_cli.types import ChatRequest, Completion, GenerationOptions, Media, ModelSpec
    from qwen2vl_cli.engine.session import ModelSession

    spec = ModelSpec(model=str(tiny_model), device="cpu", dtype="float32")
    request = ChatRequest("Describe.", [Media("image", "x", noise_image(112, 84, 8))],
                          generation=GenerationOptions(max_new_tokens=12))
    monkeypatch.setenv("QWEN2VL_FASTPATH", "off")
    plain = list(ModelSession(spec).load().stream(request))[-1]
    monkeypatch.setenv("QWEN2VL_FASTPATH", "on")
    session = ModelSession(spec).load()
    assert session.fast, "the fast path's contract check failed"  # its probe prompts are not counted
    calls: list[str] = []
    original_vision, original_tokenize = Prefill._vision, session.processor.tokenizer.__class__.__call__
    monkeypatch.setattr(Prefill, "_vision", lambda self, *a: calls.append("vision") or original_vision(self, *a))
    monkeypatch.setattr(session.processor.tokenizer.__class__, "__call__",
                        lambda self, *a, **k: calls.append("tokenize") or original_tokenize(self, *a, **k))
    fast = list(session.stream(request))[-1]
    assert isinstance(fast, Completion) and fast.text == plain.text and fast.prompt_tokens == plain.prompt_tokens
    assert calls == ["vision", "tokenize"] and session.fast.prefill.early is None


def test_prefill_graphs_are_made_for_shapes_seen_twice(tiny_model, capsys):
    """Graph policy: none for a shape's first time (a one-off command never pays for a capture), captured
    the second time and then reused, three per kind kept, none for large shapes, and a capture that fails
    turns graphs off with one warning instead of failing the request."""
    from types import SimpleNamespace

    from qwen2vl_cli.engine.fast.prefill import GRAPH_MAX_TOKENS, GRAPHS_KEPT, Prefill

    prefill = Prefill(SimpleNamespace(model=None), use_graphs=True)
    cuda = SimpleNamespace(is_cuda=True)
    made: list = []
    make = lambda key: lambda: made.append(key) or f"graph {key}"  # noqa: E731
    assert prefill._graph(("text", 64), cuda, 64, make(64)) is None and not made
    assert prefill._graph(("text", 64), cuda, 64, make(64)) == "graph 64" and made == [64]
    assert prefill._graph(("text", 64), cuda, 64, make(64)) == "graph 64" and made == [64]
    assert prefill._graph(("text", 64), SimpleNamespace(is_cuda=False), 64, make(64)) is None
    big = GRAPH_MAX_TOKENS + 64
    assert [prefill._graph(("text", big), cuda, big, make(big)) for _ in range(2)] == [None, None]
    for size in range(128, 128 + 64 * GRAPHS_KEPT, 64):
        prefill._graph(("text", size), cuda, size, make(size))
        prefill._graph(("text", size), cuda, size, make(size))
    assert ("text", 64) not in prefill.graphs and len(prefill.graphs) == GRAPHS_KEPT

    def broken():
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    prefill._graph(("vision", 1), cuda, 1, broken)
    assert prefill._graph(("vision", 1), cuda, 1, broken) is None and not prefill.use_graphs
    assert capsys.readouterr().err.count("warning: CUDA graphs unavailable") == 1
    assert prefill._graph(("text", 128), cuda, 128, make(128)) is None  # off from now on


def test_a_session_captures_shapes_seen_once_when_idle(capsys):
    """A shape seen once is remembered; `capture_pending` (an idle server's engine) captures the latest first,
    one per call, and the shape's next request replays it without a capture on its path. A few are remembered,
    none that is already captured, none once graphs are off."""
    from types import SimpleNamespace

    from qwen2vl_cli.engine.fast.prefill import PENDING_KEPT, Prefill

    prefill = Prefill(SimpleNamespace(model=None), use_graphs=True)
    cuda = SimpleNamespace(is_cuda=True)
    made: list = []
    make = lambda key: lambda: made.append(key) or f"graph {key}"  # noqa: E731
    for size in (64, 128, 64):  # 64 twice: captured on its path, as before
        prefill._graph(("text", size), cuda, size, make(size))
    assert made == [64] and list(prefill.pending) == [("text", 128)]
    assert prefill.capture_pending() and made == [64, 128] and not prefill.pending
    assert not prefill.capture_pending()
    assert prefill._graph(("text", 128), cuda, 128, make(128)) == "graph 128" and made == [64, 128]
    for size in range(192, 192 + 64 * (PENDING_KEPT + 2), 64):
        prefill._graph(("vision", size), cuda, size, make(size))
    latest = [("vision", size) for size in range(192, 192 + 64 * (PENDING_KEPT + 2), 64)][-PENDING_KEPT:]
    assert list(prefill.pending) == latest
    assert prefill.capture_pending() and made[-1] == latest[-1][1]

    def broken():
        raise RuntimeError("operation not permitted when stream is capturing")

    prefill._graph(("text", 999), cuda, 999, broken)
    while prefill.capture_pending():  # the broken one is the latest: the first call turns graphs off
        pass
    assert not prefill.use_graphs and not prefill.pending
    assert capsys.readouterr().err.count("warning: CUDA graphs unavailable") == 1


def test_a_capture_out_of_memory_leaves_that_shape_without_a_graph_and_the_rest_as_they_were(capsys):
    """Out of memory while capturing (in a request's path, or an idle session's capture_pending; raised by the
    capture or by its end, after one) is no reason to turn graphs off: that shape runs without one from then on
    (not tried again), the graphs made keep serving and other shapes are still captured. No warning."""
    from types import SimpleNamespace

    import torch

    from qwen2vl_cli.engine.fast.prefill import Prefill

    prefill = Prefill(SimpleNamespace(model=None), use_graphs=True)
    cuda = SimpleNamespace(is_cuda=True)
    made: list = []
    make = lambda key: lambda: made.append(key) or f"graph {key}"  # noqa: E731
    for _ in range(2):
        prefill._graph(("text", 64), cuda, 64, make(64))
    tries: list = []

    def no_room():
        tries.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def no_room_then_a_failed_end():
        tries.append(1)
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture") from None

    assert [prefill._graph(("vision", 1), cuda, 1, no_room) for _ in range(3)] == [None, None, None]
    prefill._graph(("vision", 2), cuda, 2, no_room_then_a_failed_end)  # seen once: left for an idle moment
    assert prefill.capture_pending() and len(tries) == 2  # each tried once
    assert prefill._graph(("vision", 2), cuda, 2, no_room_then_a_failed_end) is None and len(tries) == 2
    assert prefill.use_graphs and prefill._graph(("text", 64), cuda, 64, make(64)) == "graph 64"
    for _ in range(2):
        prefill._graph(("text", 128), cuda, 128, make(128))
    assert made == [64, 128] and ("text", 128) in prefill.graphs
    assert "warning" not in capsys.readouterr().err


def test_a_decode_capture_out_of_memory_steps_that_row_count_without_a_graph(monkeypatch, capsys):
    """Out of memory while capturing a decode step's graph (a batch grown near the GPU's limit) does not turn the
    decoder's graphs off for the session: that row count steps without one in this batch (tried once), correctly,
    and graphs stay on. The capture's warm-up step is undone as before."""
    from types import SimpleNamespace

    import torch

    from qwen2vl_cli.engine.fast import decoder as fast_decoder

    fake = SimpleNamespace(kv_heads=1, head_dim=2, device=torch.device("cpu"), dtype=torch.float32, layer_count=1,
                           use_graphs=True, _step=lambda tokens, *args: tokens + 1)
    tries: list = []

    def no_room(fn, device):
        tries.append(device)
        fn()  # the eager run before a capture: its step is undone
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(fast_decoder, "captured", no_room)
    rows = fast_decoder.Rows(fake, capacity=4, size=8, eos_ids={99}, pad_id=0)
    prompt = torch.zeros(1, 1, 3, 2)
    rows.join([(prompt, prompt)], torch.ones(1, 3, dtype=torch.long), torch.tensor([5]), torch.tensor([3]))
    host = torch.zeros(4, dtype=torch.long)
    assert [rows.step(host) for _ in range(3)] == [(None, 1)] * 3
    assert len(tries) == 1 and fake.use_graphs and rows.uncaptured == {1}
    assert host[0].item() == 8 and rows.positions[0].item() == 6  # three steps from 5 (and from position 3)
    assert "warning" not in capsys.readouterr().err


def test_a_broken_contract_steps_aside_for_the_stock_code(cli, images, monkeypatch):
    """transformers 5.24 renamed the layers' cache argument, and the fast layers silently left the cache empty:
    wrong answers, exit 0. Reproduced here on any version (fast layers that drop the cache), the load-time
    check must catch it: one note on stderr, the stock forwards back, generate's answers."""
    from qwen2vl_cli.engine import session as session_module

    expected = cli("describe", images["a"], "-n", "16")
    batch_expected = cli("batch", images["a"], images["b"], "-n", "16", "-b", "2").stdout
    break_the_fast_layers_cache(monkeypatch)
    monkeypatch.setattr(session_module, "_SESSIONS", {})
    monkeypatch.setenv("QWEN2VL_FASTPATH", "on")
    result = cli("describe", images["a"], "-n", "16")
    session = next(iter(session_module._SESSIONS.values()))
    assert session.fast is None
    assert result.exit_code == 0 and result.stdout == expected.stdout
    assert result.stderr.count("the fast path is off") == 1
    assert all("forward" not in layer.__dict__ for layer in session.model.model.language_model.layers)
    assert not session.model.model.visual._qwen2vl_fast
    batch = cli("batch", images["a"], images["b"], "-n", "16", "-b", "2")
    assert batch.stdout == batch_expected and "fast path" not in batch.stderr  # said once per session


def test_images_beside_a_video_do_not_start_the_vision_tower_early(cli, images, tmp_path, monkeypatch):
    """With a video in the conversation the prefill does not apply (the model's forward runs the vision tower),
    so the early start must not run: on CUDA it ran on CPU pixels (the processor keeps images on the CPU
    beside videos) and failed with a device mismatch; here it was wasted work. Same answer as generate."""
    from qwen2vl_cli.engine import session as session_module
    from qwen2vl_cli.engine.fast.prefill import Prefill

    from .test_video import make_video

    clip = make_video(tmp_path / "clip.mp4", frames=20)
    args = ("ask", images["a"], "--video", clip, "-q", "Same place?", "--vision-ids", "-n", "12", "--nframes", "4")
    expected = cli(*args)
    assert expected.exit_code == 0, expected.stderr
    monkeypatch.setattr(session_module, "_SESSIONS", {})
    monkeypatch.setenv("QWEN2VL_FASTPATH", "on")
    cli("ask", "-q", "Hello.", "-n", "2")  # the fast decoder is built (and its probes run) before counting
    starts: list = []
    original = Prefill.start
    monkeypatch.setattr(Prefill, "start", lambda self, inputs: starts.append(1) or original(self, inputs))
    result = cli(*args)
    assert result.exit_code == 0 and result.stdout == expected.stdout
    assert starts == []


def test_a_passed_check_is_remembered_for_the_next_load(tiny_model, monkeypatch):
    """A fast-path check that passed is not run again at the next load of the same model with the same software
    (remembered per user, as on CUDA; here forced on for the CPU): the next load answers the same through the fast
    path without running the stock model on the probes; a file that cannot be read means checking again."""
    from qwen2vl_cli.engine import session as sessions
    from qwen2vl_cli.engine.fast import checks
    from qwen2vl_cli.engine.fast import decoder as fastpath
    from qwen2vl_cli.types import ChatRequest, GenerationOptions, Media, ModelSpec

    monkeypatch.setattr(checks, "REMEMBERED_ON", ("cpu", "cuda"))
    monkeypatch.setenv("QWEN2VL_FASTPATH", "on")
    checks_file = checks.checks_file()
    checks_file.unlink(missing_ok=True)
    references: list[int] = []
    original = fastpath._reference
    monkeypatch.setattr(fastpath, "_reference", lambda *a: references.append(1) or original(*a))
    spec = ModelSpec(model=str(tiny_model), device="cpu", dtype="float32")
    request = ChatRequest("Describe.", [Media("image", "x", noise_image(84, 56, 21))],
                          generation=GenerationOptions(max_new_tokens=10))

    def load_and_answer():
        before = len(references)
        session = sessions.ModelSession(spec).load()
        assert session.fast, "the fast path is off"
        answer = session.generate_batch([request])[0].text
        session.engine.close(wait_s=10)
        return session, len(references) - before, answer

    first, checked, answer = load_and_answer()
    assert checked == 3 and not first.fast.checked_before and checks_file.exists()
    second, checked_again, same = load_and_answer()
    assert checked_again == 0 and second.fast.checked_before and same == answer
    assert second.fast.errors == first.fast.errors and "check passed at an earlier load" in second.describe_weights()
    for damage in ("{not json", json.dumps({checks.key(first.model, "cpu", None): {"errors": "none"}})):
        checks_file.write_text(damage)
        third, checked_after_damage, _ = load_and_answer()
        assert checked_after_damage == 3 and not third.fast.checked_before, damage
    assert checks.passed(checks.key(first.model, "cpu", None)) == first.fast.errors  # written again
    # on CUDA the GPU's name and capability are in the key (here without a GPU: torch's answers stood in)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: f"GPU {index}")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    on_cuda = {checks.key(first.model, device, None) for device in ("cuda", "cuda:0", "cuda:1")}
    assert len(on_cuda) == 2 and checks.key(first.model, "cpu", None) not in on_cuda
    assert checks.key(first.model, "cuda", "GPTQ-Int4") not in on_cuda
