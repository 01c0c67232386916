"""ModelSession: loads Qwen2-VL and its processor once per process, builds prompts the seed recipe's way,
turns requests into tensors, and answers through its Engine (engine/scheduler.py), which owns generation.
torch and transformers are imported only when a session loads.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import sys
import threading
import time
from typing import Any, Iterator

from ..errors import ModelLoadError, UsageError
from ..modelfiles import (explain_load_failure, hub_offline, hub_reachable, local_model_dir, not_cached_message,
                          validate_model_dir)
from ..types import ChatRequest, Completion, GenerationOptions, Media, ModelSpec, TextDelta, stop_at


class _Penalties:
    """OpenAI's frequency and presence penalties, over the tokens generated so far (not the prompt)."""

    def __init__(self, prompt_len: int, frequency: float | None, presence: float | None) -> None:
        self.prompt_len, self.frequency, self.presence = prompt_len, frequency or 0.0, presence or 0.0

    def __call__(self, input_ids, scores):
        import torch

        generated = input_ids[:, self.prompt_len:]
        if not generated.shape[1]:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class ModelSession:
    """Qwen2-VL and its processor, loaded once, reused for every request of the process."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.model = None
        self.processor = None
        self.detokenizer = None  # what answers are decoded with (load, decode)
        self.device: str | None = None
        self.resolved: dict[str, str] = {}  # device, dtype and attn as loaded (load)
        self.context: int | None = None  # the model's positions: prompt + answer must fit
        self.load_s: float = 0.0
        self.phases: dict[str, float] = {}  # where load_s went (imports, weights, ...), for --verbose
        # tokenizing changes the fast tokenizer's padding settings: two threads must not tokenize at once
        # (decoding needs no lock: see decode; processing images needs none: see _Processing)
        self.tokenizer_lock = threading.Lock()
        self._processing: _Processing | None = None
        self.fast = None  # fast.decoder.FastDecoder where the fast path is on (decided at load)
        self.quantization: str | None = None  # "GPTQ-Int4", ...: what the loaded weights are
        self.eos_ids: set[int] = set()
        self.pad_id = 0
        self._prepare_stream = None  # CUDA stream for GPU-side preprocessing
        self._engine = None

    # ---- loading -------------------------------------------------------------------------------
    def load(self) -> "ModelSession":
        """Load model and processor (once); raise ModelLoadError with a fix when it cannot."""
        if self.model is not None:
            return self
        with collector_paused():
            return self._load()

    def _load(self) -> "ModelSession":
        start = time.perf_counter()
        folder = local_model_dir(self.spec.model)  # everything checked before anything heavy is loaded
        if folder is not None:
            validate_model_dir(folder, self.spec.model)
        elif hub_offline() or not hub_reachable():
            raise ModelLoadError(self.spec.model, not_cached_message(self.spec.model))
        import logging

        logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # torchao's import-time deprecations
        checked = time.perf_counter()
        import torch

        device = resolve_device(self.spec.device)
        warming = start_warm_up(device)  # beside the imports below
        import transformers
        from transformers import AutoConfig, AutoProcessor, Qwen2VLForConditionalGeneration

        from . import quant

        transformers.utils.logging.set_verbosity_error()  # the spinner and our errors say what matters
        transformers.utils.logging.disable_progress_bar()
        imported = time.perf_counter()
        local = {"local_files_only": True} if folder else {}  # from the cache when it holds the model
        try:
            config = AutoConfig.from_pretrained(self.spec.model, **local)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(self.spec.model, explain_load_failure(self.spec.model, exc)) from exc
        quantization = quant.quantization_of(config)
        extra = quant.load_kwargs(self.spec.model, config, self.spec.quantize, device)
        # quantized kernels run in half precision on CUDA (float16, the checkpoints' own), float32 elsewhere
        dtype = resolve_dtype("float16" if extra and self.spec.dtype == "auto" and device.startswith("cuda")
                              else self.spec.dtype, device)
        attn = resolve_attn(self.spec.attn, device, dtype)

        marks = {}

        def load_both(**kw):
            processor = AutoProcessor.from_pretrained(self.spec.model, **kw)
            marks["processor"] = time.perf_counter()
            model, info = Qwen2VLForConditionalGeneration.from_pretrained(
                self.spec.model, dtype=getattr(torch, dtype), attn_implementation=attn, device_map=device,
                output_loading_info=True, **extra, **kw)
            if extra:
                quant.check_loading_info(self.spec.model, info)
                quant.eager(model)
            return processor, model

        try:
            with quant.quiet_loading(bool(extra)):
                self.processor, self.model = load_both(**local)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError, ImportError, NotImplementedError) as exc:
            if type(exc).__name__ == "OutOfMemoryError":
                raise
            raise ModelLoadError(self.spec.model, explain_load_failure(self.spec.model, exc)) from exc
        self.quantization = quant.describe(quantization, self.spec.quantize)
        self.model.eval()
        self.processor.tokenizer.padding_side = "left"
        self._processing = _Processing(self.processor, self.tokenizer_lock)
        # answers decode with the processor's own tokenizer (see decode); without a GIL (free-threaded Python)
        # a decode could overlap a settings change, so there they get a copy (~1 s of a load)
        gil = getattr(sys, "_is_gil_enabled", lambda: True)()
        self.detokenizer = self.processor.tokenizer if gil else copy.deepcopy(self.processor.tokenizer)
        self.device = device
        self.resolved = {"device": device, "dtype": dtype, "attn": attn}  # what "auto" became (a session's /health)
        text = getattr(self.model.config, "text_config", self.model.config)
        self.context = (getattr(text, "max_position_embeddings", None)
                        or getattr(self.model.config, "max_position_embeddings", None))
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        pad = self.model.generation_config.pad_token_id
        self.pad_id = min(self.eos_ids) if pad is None else pad
        if warming is not None:
            warming.join()
        loaded = time.perf_counter()
        self.fast = self._enable_fast()
        self.load_s = time.perf_counter() - start
        self.phases = {"checks": checked - start, "imports": imported - checked,
                       "processor": marks["processor"] - imported, "weights": loaded - marks["processor"],
                       "fast path check": start + self.load_s - loaded}
        return self

    @property
    def loaded(self) -> bool:
        return self.model is not None

    @property
    def engine(self):
        """The Engine (scheduler.py) that answers for this session: made on first use."""
        if self._engine is None:
            from .scheduler import Engine

            self._engine = Engine(self)
        return self._engine

    def stream(self, request: ChatRequest) -> Iterator[TextDelta | Completion]:
        """One answer: TextDelta pieces as they come, then one Completion (the engine schedules it)."""
        self.load()
        return self.engine.stream(request)

    def submit(self, request: ChatRequest, emit, stream: bool = False, prepared=None):
        """Queue one request with the engine; `emit` gets its events (see scheduler.Ticket)."""
        self.load()
        return self.engine.submit(request, emit, stream, prepared)

    def generate_batch(self, requests: list[ChatRequest]) -> list[Completion]:
        """Answers to several requests, in their order (the engine batches them with whatever else runs)."""
        self.load()
        return self.engine.generate(requests)

    def unload(self) -> None:
        """Free the model's memory (the server's --keep-alive); the next request loads it again."""
        if self.model is None:
            return
        self.model = None
        self.fast = None
        if self._engine is not None:
            self._engine.drop_cache()
        import torch

        gc.unfreeze()  # the model was frozen with the rest of its load (collector_paused); its cycles go now
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---- media ---------------------------------------------------------------------------------
    def image_media(self, image) -> Media:
        """An image read (sources.read_image) as the engine takes it: the picture itself, sized."""
        return Media("image", image.name, image.sized(), facts=image.facts)

    def video_media(self, video) -> Media:
        """A sampled video (video.resolve_video) as the engine takes it: the frames and their timing."""
        return Media("video", video.source, video.frames, metadata=video.metadata, facts=video.facts,
                     notes=video.notes)

    # ---- prompts and tensors -------------------------------------------------------------------
    def prompt_text(self, request: ChatRequest) -> str:
        """The chat-template prompt, exactly as the seed recipe builds it."""
        return self.processor.apply_chat_template(
            request.messages(), tokenize=False, add_generation_prompt=True, add_vision_id=request.vision_ids)

    def prepare(self, requests: list[ChatRequest], on_device: bool = False, on_images=None):
        """Tokenize and patchify a batch of requests (left padding); safe from a worker thread.

        On the CPU by default (pinned for a quick copy). `on_device` normalizes and patchifies images on
        the GPU: on a side stream, so that it runs beside a generation in flight (it is done on return),
        or on the current stream when `on_images` is given. `on_images(image_inputs)` is called as soon as
        the images are processed, before the prompt is tokenized: the fast path starts the vision tower.
        """
        self.check_context(requests)  # the media alone: before any work on them
        images = [m.data for r in requests for m in r.media if m.kind == "image"]
        videos = [m.data for r in requests for m in r.media if m.kind == "video"]
        kwargs: dict[str, Any] = {}
        if videos:
            kwargs["video_metadata"] = [m.metadata for r in requests for m in r.media if m.kind == "video"]
            kwargs["do_sample_frames"] = False
        elif images and on_device and self.device and self.device.startswith("cuda"):
            kwargs["device"] = self.device
        import torch

        texts = [self.prompt_text(r) for r in requests]
        stream = self._side_stream() if "device" in kwargs and on_images is None else None
        with torch.cuda.stream(stream), self._processing.call(on_images, bool(images) and not videos):  # (no stream: no-op)
            inputs = self.processor(text=texts, images=images or None, videos=videos or None, padding=True,
                                    return_tensors="pt", do_resize=False, **kwargs)  # media are sized already
        with torch.cuda.stream(stream):  # grids on the host for good: a later .cpu() waits for the decode steps queued
            for key in ("image_grid_thw", "video_grid_thw"):
                if key in inputs and inputs[key].is_cuda:
                    inputs[key] = inputs[key].cpu()
        if stream is not None:
            stream.synchronize()
        self.check_context(requests, inputs["attention_mask"].sum(dim=1).tolist())
        if self.device and self.device.startswith("cuda"):
            inputs = inputs.__class__({k: v if v.is_cuda else v.pin_memory() for k, v in inputs.items()})
        return inputs

    def prepare_one(self, request: ChatRequest, early: bool = False):
        """`prepare` for one request, its images processed on the GPU; `early`: the fast path's vision tower
        starts on them while the prompt is tokenized (on the calling thread's stream: the engine's)."""
        images_only = all(m.kind == "image" for m in request.media)
        start = self.fast.prefill.start if early and self.fast and images_only else None
        return self.prepare([request], on_device=True, on_images=start)

    def collate(self, prepared: list):
        """Several `prepare_one` results as one batch, as `prepare` would have made it: prompts left-padded, media
        tensors one after another."""
        import torch

        width = max(p["input_ids"].shape[1] for p in prepared)
        pads = {"input_ids": self.processor.tokenizer.pad_token_id or 0, "attention_mask": 0, "mm_token_type_ids": 0}
        batch = {}
        for key in prepared[0].keys():
            values = [p[key] for p in prepared if p.get(key) is not None]
            if key in pads:
                values = [torch.nn.functional.pad(v.to(values[0].device), (width - v.shape[1], 0), value=pads[key])
                          for v in values]
            batch[key] = torch.cat([v.to(values[0].device) for v in values]) if isinstance(values[0], torch.Tensor) else values
        for key in {k for p in prepared for k in p.keys()} - set(batch):
            batch[key] = torch.cat([p[key] for p in prepared if p.get(key) is not None])
        return prepared[0].__class__(batch)

    def check_context(self, requests: list[ChatRequest], prompt_tokens: list[int] | None = None) -> None:
        """Prompt + media + new tokens must fit the model's context: a UsageError naming the numbers, before
        minutes of work on a request that cannot be answered. Without prompt_tokens, the media tokens alone."""
        context = self.context
        for row, request in enumerate(requests):
            media = sum(int(m.facts.get("tokens", 0)) for m in request.media if m.facts)
            prompt = prompt_tokens[row] if prompt_tokens is not None else media
            if context and prompt + request.generation.max_new_tokens > context:
                subject = ", ".join(m.source for m in request.media) or "the prompt"
                size = (f"the prompt is {prompt} tokens ({media} of them images/video)" if prompt_tokens
                        else f"the images/video alone are {media} tokens")
                raise UsageError(subject, f"{size} + --max-new-tokens {request.generation.max_new_tokens}: over the "
                                          f"model's context of {context} tokens (lower --max-pixels or "
                                          "--max-new-tokens)")

    def prompt_tokens(self, request: ChatRequest) -> int:
        """The prompt's length in tokens, its media included, without processing any media."""
        with self.tokenizer_lock:
            text = len(self.processor.tokenizer(self.prompt_text(request))["input_ids"])
        # the template holds one pad token per image or video; the processor expands each to its tokens
        return text + sum(int(m.facts.get("tokens", 1)) - 1 for m in request.media)

    def _side_stream(self):
        import torch

        if self._prepare_stream is None:
            self._prepare_stream = torch.cuda.Stream(device=self.device)
        return self._prepare_stream

    def to_device(self, inputs):
        """A copy of `inputs` on the model's device; `inputs` stay on the host (BatchFeature.to moves in place, and
        the prefill reads token ids and grids from the host copy: from a GPU one each read would wait for the GPU)."""
        import torch

        moved = inputs.__class__(dict(inputs)).to(self.model.device, non_blocking=True)
        for value in moved.values():
            if value.is_cuda:  # made on the side stream: keep its memory until this stream is done with it
                value.record_stream(torch.cuda.current_stream(value.device))
        return moved

    def generate_kwargs(self, options: GenerationOptions) -> dict:
        """generate() arguments: greedy unless sampling was asked for."""
        from transformers import GenerationConfig

        config = GenerationConfig.from_dict(self.model.generation_config.to_dict())
        config.max_new_tokens = options.max_new_tokens
        config.do_sample = options.sampling
        config.temperature, config.top_p, config.top_k = 1.0, 1.0, 50
        if options.sampling:
            if options.temperature is not None:
                config.temperature = options.temperature
            config.top_p = options.top_p if options.top_p is not None else 1.0
            config.top_k = options.top_k if options.top_k is not None else 0
        config.repetition_penalty = options.repetition_penalty or 1.0
        if options.seed is not None:
            from transformers import set_seed

            set_seed(options.seed % 2 ** 32)  # its range; an API's 64-bit (or negative) seed maps into it
        return {"generation_config": config}

    # ---- generation ----------------------------------------------------------------------------
    def fast_path_enabled(self, options: GenerationOptions) -> bool:
        """Whether the fast path answers with these options: greedy, no penalties, where it is on."""
        return bool(self.fast) and not options.sampling and not options.penalized

    def _enable_fast(self):
        """The fast path (fast.decoder), an explicit step of loading: by default on CUDA, QWEN2VL_FASTPATH=on|off
        forces it; float, GPTQ and AWQ weights (quant.fast_path_takes). Checked against the stock model on probe
        prompts (unless that passed at an earlier load: fast/checks.py); where that fails, None and one note on
        stderr (the stock code answers)."""
        from . import quant

        setting = os.environ.get("QWEN2VL_FASTPATH", "auto").strip().lower()
        wanted = (self.device or "").startswith("cuda") if setting == "auto" else setting in ("1", "on", "true", "yes")
        if not wanted or not quant.fast_path_takes(self.quantization):
            return None
        import transformers

        from .fast import checks
        from .fast.decoder import ContractError, enable

        key = checks.key(self.model, self.device, self.quantization)  # a check that passed is not run again
        remembered = checks.passed(key) if key else None
        probes = [] if remembered is not None else [(self.to_device(p), p) for p in map(self.prepare, _contract_probes())]
        try:
            decoder = enable(self.model, probes)
        except ContractError as exc:
            print(f"qwen2vl: note: the fast path is off with transformers {transformers.__version__} ({exc}); "
                  "answering with transformers' generate", file=sys.stderr)
            return None
        if remembered is not None:
            decoder.errors, decoder.checked_before = remembered, True
        elif key:
            checks.remember(key, decoder.errors)
        return decoder

    def describe_weights(self) -> str:
        """One --verbose line: what was loaded and which path answers."""
        weights = self.quantization or str(self.model.dtype).removeprefix("torch.")
        from . import quant

        if self.fast:
            fused, total = self.fast.quantized[True], sum(self.fast.quantized.values())
            kernel = f"; the fused dequantizing kernel runs {fused} of {total} quantized projections" if total else ""
            checked = "; its check passed at an earlier load" if self.fast.checked_before else ""
            path = f"fast path on (continuous batching{kernel}{checked})"
        elif not (self.device or "").startswith("cuda"):
            path = "fast path off (CPU)"
        elif not quant.fast_path_takes(self.quantization):
            path = "fast path off (bitsandbytes layers: transformers' generate)"
        else:
            path = "fast path off (its check failed)"
        phases = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in self.phases.items() if seconds >= 0.05)
        return f"{self.spec.model}: {weights} weights on {self.device}; {path}; loaded in {self.load_s:.1f}s ({phases})"

    def generate_stock(self, inputs, options: GenerationOptions, answers) -> None:
        """transformers' `generate` over a batch, each row's tokens handed to its Answer as they come; a row
        stops when its Answer is done."""
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        from .tickets import AnswersDone, Feed

        extra = {}
        if options.frequency_penalty or options.presence_penalty:
            extra["logits_processor"] = LogitsProcessorList([_Penalties(
                inputs["input_ids"].shape[1], options.frequency_penalty, options.presence_penalty)])
        with torch.inference_mode():
            self.model.generate(**inputs, streamer=Feed(answers), stopping_criteria=StoppingCriteriaList([AnswersDone(answers)]),
                                **extra, **self.generate_kwargs(options))

    def decode(self, ids: list[int]) -> str:
        """Token ids to text, from any thread, without waiting for a prompt being tokenized: the Rust tokenizer
        decodes holding the GIL and changes its settings only holding it, so the two never overlap (a deep copy
        for decoding cost up to a second of every load; tests/test_engine.py hammers both at once)."""
        return self.detokenizer.decode(ids, skip_special_tokens=True)

    def whole_text(self, ids: list[int]) -> str:
        """The text of `ids` less a character they end inside (an answer cut by its length in the middle of a
        character's bytes decodes to U+FFFD there): the text of the longest prefix that does not end in one, as a
        stream shows it (tickets.Answer) and as vLLM and tokenizers' DecodeStream leave it. An unfinished character
        is at most 3 bytes, so at most 3 tokens; a longer run of U+FFFD (a model repeating a stray byte) is cut off
        without decoding every prefix of it (each decode reads the whole answer)."""
        text = self.decode(ids)
        for end in range(len(ids) - 1, max(-1, len(ids) - 5), -1):
            if not text.endswith("\ufffd"):
                return text
            text = self.decode(ids[:end])
        return text.rstrip("\ufffd")

    def completion(self, ids: list[int], prompt_tokens: int, options: GenerationOptions,
                   first_token_s: float | None, total_s: float) -> Completion:
        """The Completion of generated `ids`: cut after the first end token, and before a stop string."""
        for index, token in enumerate(ids):
            if token in self.eos_ids:
                ids, reason = ids[: index + 1], "stop"
                break
        else:
            reason = "length" if len(ids) >= options.max_new_tokens else "stop"
        text = self.whole_text(ids)
        cut = stop_at(text, options.stop) if options.stop else None
        if cut is not None:  # the answer ends before the stop string; count the tokens up to it
            low, high = 1, len(ids)
            while low < high:  # the shortest prefix whose text reaches the stop string
                middle = (low + high) // 2
                if stop_at(self.decode(ids[:middle]), options.stop) is None:
                    low = middle + 1
                else:
                    high = middle
            text, ids, reason = text[:cut], ids[:low], "stop"
        return Completion(text, prompt_tokens, len(ids), reason, first_token_s, total_s)


class _Processing:
    """Calls of the processor from several threads at once (the prepare threads, the engine's): their images are
    processed side by side and only their tokenizing holds the tokenizer lock. Installed once at load, it
    takes the lock as soon as a call's images are done (transformers' ProcessorMixin processes images first,
    then tokenizes) and runs that call's callback there first: the fast path starts its vision tower on the
    images while the prompt is tokenized. A call without images, or with videos, holds the lock throughout."""

    def __init__(self, processor, lock: threading.Lock) -> None:
        from ..compat import after_image_processing

        self.lock, self.local = lock, threading.local()
        self.hooked = after_image_processing(processor, self._images_done)

    def _images_done(self, image_inputs) -> None:
        call = self.local
        if getattr(call, "callback", None) is not None:
            call.callback(image_inputs)
        if getattr(call, "active", False) and not call.held:
            self.lock.acquire()
            call.held = True

    @contextlib.contextmanager
    def call(self, callback=None, images_only: bool = False):
        """Around one `processor(...)` call on this thread: `callback(image_inputs)` once its images are done."""
        call = self.local
        call.callback, call.active, call.held = callback, True, False
        if not images_only or not self.hooked:
            self.lock.acquire()
            call.held = True
        try:
            yield
        finally:
            call.active, call.callback = False, None
            if call.held:
                call.held = False
                self.lock.release()


def _contract_probes() -> list[list[ChatRequest]]:
    """Prompts the fast path is checked on at load (fastpath.FastDecoder): one image, a padded batch of an
    image and a text-only prompt (the model's own forward), and text alone (the prefill's text path)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)

    def image(width: int, height: int) -> Media:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        return Media("image", "probe", Image.fromarray(pixels))

    return [[ChatRequest("Describe this image.", [image(56, 56)])],
            [ChatRequest("What is in this picture?", [image(84, 56)]), ChatRequest("Hi.")],
            [ChatRequest("Write a haiku about GPUs.")]]


_SESSIONS: dict[ModelSpec, ModelSession] = {}


@contextlib.contextmanager
def collector_paused():
    """No cyclic garbage collection while a load makes its ~400,000 long-lived objects (modules of torch and
    transformers, the model): their growth set off full collections that walked them again and again (0.8 s of
    every load on an H100, 0.56 s of 4.3 on the CPU test machine). A load that succeeds ends with all it made
    frozen (`gc.freeze`), so later full collections (in a session, between requests) walk only what came after;
    `unload` unfreezes them first, or the model's reference cycles (its layers' bound forwards) would keep its
    memory."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
        gc.freeze()
    finally:
        if enabled:
            gc.enable()


def get_session(spec: ModelSpec) -> ModelSession:
    """The process-wide session for `spec`: each model loads once per process."""
    if spec not in _SESSIONS:
        _SESSIONS[spec] = ModelSession(spec)
    return _SESSIONS[spec]


def resolve_device(device: str) -> str:
    """auto -> cuda, else mps, else cpu; check an explicit choice is available."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelLoadError(device, "CUDA is not available on this machine (try --device cpu)")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ModelLoadError(device, f"no such GPU (this machine has {torch.cuda.device_count()})")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelLoadError(device, "MPS is not available on this machine (try --device cpu)")
    return device


def start_warm_up(device: str) -> threading.Thread | None:
    """On CUDA, a thread that does beside a load's imports what its first answer would otherwise wait for: the
    CUDA context, cuBLAS and attention kernels loaded, and Triton's cache key (a hash of all of Triton, 0.85 s
    on an H200). On the H200 a first answer's first token came 0.8 s sooner (1.47 -> 0.67 s). Failures are
    left to the load to meet and report. Not a daemon: an exit waits for it rather than tear CUDA down under it."""
    if not device.startswith("cuda"):
        return None

    def warm_up() -> None:
        import torch

        try:
            with torch.cuda.device(device):
                dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
                heads = torch.ones(1, 16, 64, 80, device=device, dtype=dtype)  # the vision tower's head size
                torch.nn.functional.scaled_dot_product_attention(heads, heads, heads) @ heads.transpose(-1, -2)
                torch.cuda.synchronize()
            if os.environ.get("QWEN2VL_FASTPATH", "auto").strip().lower() not in ("0", "off", "false", "no"):
                from triton.runtime.cache import triton_key

                triton_key()  # remembered for the process (functools.lru_cache)
        except Exception:  # noqa: BLE001 - a warm-up only
            pass

    thread = threading.Thread(target=warm_up, name="qwen2vl-warm-up")
    thread.start()
    return thread


def resolve_dtype(dtype: str, device: str) -> str:
    """auto -> bfloat16 on CUDA (float16 where bf16 is missing), float16 on MPS, float32 on CPU."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float16" if device == "mps" else "float32"


def resolve_attn(attn: str, device: str, dtype: str) -> str:
    """auto -> flash_attention_2 when installed on CUDA in half precision, else sdpa."""
    if attn != "auto":
        if attn == "flash_attention_2" and not flash_attn_installed():
            raise ModelLoadError("--attn flash_attention_2", "flash-attn is not installed "
                                 "(pip install 'qwen2vl-cli[flash]')")
        return attn
    if device.startswith("cuda") and dtype in ("bfloat16", "float16") and flash_attn_installed():
        return "flash_attention_2"
    return "sdpa"


def flash_attn_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None
