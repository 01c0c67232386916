"""ModelSession: loads Qwen2-VL and its processor once per process, builds prompts the seed recipe's
way, and generates: `stream()` for one conversation, `generate_batch()` for many.

The chat request types live here too; they are plain data that the CLI, the batch runner and the
server all build. torch and transformers are imported only when a session loads.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

from .errors import ModelLoadError, UsageError
from .modelfiles import (explain_load_failure, hub_offline, hub_reachable, local_model_dir, not_cached_message,
                         validate_model_dir)

DEFAULT_MODEL = "Qwen/Qwen2-VL-2B-Instruct"
DEFAULT_MAX_NEW_TOKENS = 512
DEVICES = ("auto", "cuda", "cpu", "mps")
DTYPES = ("auto", "bfloat16", "float16", "float32")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")


def default_model() -> str:
    """The model used when --model is not given: $QWEN2VL_MODEL, else Qwen2-VL-2B-Instruct."""
    return os.environ.get("QWEN2VL_MODEL") or DEFAULT_MODEL


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load, and where and how."""

    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    attn: str = "auto"
    quantize: str | None = None  # "4bit" or "8bit": quantize on load with bitsandbytes


@dataclass(frozen=True)
class GenerationOptions:
    """Decoding settings; greedy unless a sampling option is given."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()  # the answer ends before the first of these strings (not included)
    frequency_penalty: float | None = None  # OpenAI's: minus penalty x times a token was generated so far
    presence_penalty: float | None = None  # OpenAI's: minus penalty once a token has been generated

    @property
    def penalized(self) -> bool:
        """Any penalty that changes the logits (the fast path takes none of them)."""
        return (self.repetition_penalty not in (None, 1.0) or bool(self.frequency_penalty)
                or bool(self.presence_penalty))

    @property
    def sampling(self) -> bool:
        if self.temperature is not None:
            return self.temperature > 0
        return self.top_p is not None or self.top_k is not None


@dataclass
class Media:
    """One image or video of a conversation, decoded and sized for the processor."""

    kind: Literal["image", "video"]
    source: str
    data: Any
    metadata: Any = None  # video: the sampling metadata the processor needs
    facts: dict = field(default_factory=dict)  # what the model sees: sizes, frames, tokens
    notes: list[str] = field(default_factory=list)  # what was reduced to fit, for stderr


@dataclass
class ChatRequest:
    """One conversation turn: media and a prompt, optionally a system message.

    `conversation` holds a whole multi-turn chat instead (the server's requests), with the media
    objects in place; `media` then lists them in order.
    """

    prompt: str
    media: list[Media] = field(default_factory=list)
    system: str | None = None
    vision_ids: bool = False
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    conversation: list[dict] | None = None

    def messages(self) -> list[dict]:
        """The conversation in the form qwen-vl-utils and the chat template take."""
        if self.conversation is not None:
            return self.conversation
        content: list[dict] = [{"type": m.kind, m.kind: m.data} for m in self.media]
        content.append({"type": "text", "text": self.prompt})
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages.append({"role": "user", "content": content})
        return messages


@dataclass
class TextDelta:
    """A piece of the answer, as it is generated."""

    text: str


@dataclass
class Completion:
    """The whole answer with its usage and timings (seconds)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    first_token_s: float | None
    total_s: float


class _Stop:
    """A stopping criterion that ends generation when the caller goes away (Ctrl-C, closed stream), or when
    `event` (anything with is_set(), e.g. "every request of this batch was cancelled") says so."""

    def __init__(self, event=None) -> None:
        self.event = event if event is not None else threading.Event()

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


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


def stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop string starts in `text`, or None."""
    found = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return min(found) if found else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` could be the start of a stop string (not shown yet)."""
    return max((n for stop in stops for n in range(min(len(stop) - 1, len(text)), 0, -1)
                if text.endswith(stop[:n])), default=0)


class ModelSession:
    """Qwen2-VL and its processor, loaded once, reused for every request of the process."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.model = None
        self.processor = None
        self.device: str | None = None
        self.context: int | None = None  # the model's positions: prompt + answer must fit
        self.load_s: float = 0.0
        self.tokenizer_lock = threading.Lock()  # fast tokenizers must not be used from two threads at once
        self.fast = None  # FastDecoder, built on first greedy use where enabled; False: its contract check failed
        self.quantization: str | None = None  # "GPTQ-Int4", ...: what the loaded weights are
        self._prepare_stream = None  # CUDA stream for GPU-side preprocessing
        self._streams = None  # one long-lived thread generates streamed answers: per-thread GPU caches stay warm

    # ---- loading -------------------------------------------------------------------------------
    def load(self) -> "ModelSession":
        """Load model and processor (once); raise ModelLoadError with a fix when it cannot."""
        if self.model is not None:
            return self
        start = time.perf_counter()
        folder = local_model_dir(self.spec.model)  # everything checked before anything heavy is loaded
        if folder is not None:
            validate_model_dir(folder, self.spec.model)
        elif hub_offline() or not hub_reachable():
            raise ModelLoadError(self.spec.model, not_cached_message(self.spec.model))
        import logging

        logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # torchao's import-time deprecations
        import torch
        import transformers
        from transformers import AutoConfig, AutoProcessor, Qwen2VLForConditionalGeneration

        from . import quant

        transformers.utils.logging.set_verbosity_error()  # the spinner and our errors say what matters
        transformers.utils.logging.disable_progress_bar()
        device = resolve_device(self.spec.device)
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

        def load_both(**kw):
            processor = AutoProcessor.from_pretrained(self.spec.model, **kw)
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
        # answers are decoded with a copy: decoding never waits for a batch being tokenized on another thread
        self.detokenizer = copy.deepcopy(self.processor.tokenizer)
        self.device = device
        text = getattr(self.model.config, "text_config", self.model.config)
        self.context = (getattr(text, "max_position_embeddings", None)
                        or getattr(self.model.config, "max_position_embeddings", None))
        self.load_s = time.perf_counter() - start
        return self

    def unload(self) -> None:
        """Free the model's memory (the server's --keep-alive); the next request loads it again."""
        if self.model is None:
            return
        self.model = None
        self.fast = None
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---- media ---------------------------------------------------------------------------------
    def image_media(self, source: str, options, limits) -> Media:
        """An image source, decoded and sized for this model (sources.resolve_image)."""
        from .sources import PATCH_FACTOR, display_name, resolve_image

        image = resolve_image(source, options, limits)
        width, height = image.size
        return Media("image", display_name(source), image,
                     facts={"width": width, "height": height, "tokens": width * height // PATCH_FACTOR ** 2})

    def video_media(self, source: str, options, limits) -> Media:
        """A video, frame directory or glob, sampled and sized (video.resolve_video)."""
        from .video import resolve_video

        video = resolve_video(source, options, limits)
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
        with torch.cuda.stream(stream), self.tokenizer_lock, _after_images(self.processor, on_images):  # (no stream: no-op)
            inputs = self.processor(text=texts, images=images or None, videos=videos or None, padding=True,
                                    return_tensors="pt", do_resize=False, **kwargs)  # media are sized already
        if stream is not None:
            stream.synchronize()
        self.check_context(requests, inputs["attention_mask"].sum(dim=1).tolist())
        if self.device and self.device.startswith("cuda"):
            inputs = inputs.__class__({k: v if v.is_cuda else v.pin_memory() for k, v in inputs.items()})
        return inputs

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
        import torch

        moved = inputs.to(self.model.device, non_blocking=True)
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

            set_seed(options.seed)
        return {"generation_config": config}

    # ---- generation ----------------------------------------------------------------------------
    def fast_path_enabled(self, options: GenerationOptions) -> bool:
        """The static-cache decoder serves greedy decoding: by default on CUDA, QWEN2VL_FASTPATH=on|off forces it;
        never for quantized weights (its fused projections read float weights) nor where its contract check
        with this transformers failed (the stock code answers then)."""
        setting = os.environ.get("QWEN2VL_FASTPATH", "auto").strip().lower()
        wanted = (self.device or "").startswith("cuda") if setting == "auto" else setting in ("1", "on", "true", "yes")
        return (wanted and not options.sampling and not options.penalized and not self.quantization
                and self._fast_decoder() is not None)

    def describe_weights(self) -> str:
        """One --verbose line: what was loaded and which path answers."""
        weights = self.quantization or str(self.model.dtype).removeprefix("torch.")
        if self.quantization:
            path = "fast path off (quantized layers: transformers' generate)"
        else:
            path = "fast path " + ("on" if (self.device or "").startswith("cuda") else "off (CPU)")
        return f"{self.spec.model}: {weights} weights on {self.device}; {path}"

    def _fast_decoder(self):
        """The FastDecoder, built on first use and checked against the stock model on probe prompts; None
        (with one note on stderr) where that check fails."""
        if self.fast is None:
            import transformers

            from .fastpath import ContractError, FastDecoder

            probes = [(self.to_device(prepared), prepared) for prepared in map(self.prepare, _contract_probes())]
            try:
                self.fast = FastDecoder(self.model, probes)
            except ContractError as exc:
                self.fast = False
                print(f"qwen2vl: note: the fast path is off with transformers {transformers.__version__} ({exc}); "
                      "answering with transformers' generate", file=sys.stderr)
        return self.fast or None

    def _generate(self, inputs, options: GenerationOptions, streamer=None, stop: "_Stop | None" = None, host=None):
        """Prompt + new token ids for a batch: the fast decoder where it applies, else `model.generate`.
        `host` is `inputs` as prepared, before the copy to the GPU (the fast path reads token ids there)."""
        import torch
        from transformers import StoppingCriteriaList

        if self.fast_path_enabled(options):
            eos = self.model.generation_config.eos_token_id
            eos_ids = set(eos if isinstance(eos, list) else [eos])
            pad = self.model.generation_config.pad_token_id
            return self._fast_decoder().generate(inputs, options.max_new_tokens, eos_ids,
                                                 min(eos_ids) if pad is None else pad, streamer=streamer,
                                                 stop=stop.event if stop else None, host=host)
        with torch.inference_mode():
            extra = {"stopping_criteria": StoppingCriteriaList([stop])} if stop else {}
            if options.frequency_penalty or options.presence_penalty:
                from transformers import LogitsProcessorList

                extra["logits_processor"] = LogitsProcessorList([_Penalties(
                    inputs["input_ids"].shape[1], options.frequency_penalty, options.presence_penalty)])
            return self.model.generate(**inputs, streamer=streamer, **extra, **self.generate_kwargs(options))

    def stream(self, request: ChatRequest) -> Iterator[TextDelta | Completion]:
        """Generate one answer: TextDelta pieces as they come, then one Completion."""
        from transformers import TextIteratorStreamer

        self.load()
        start = time.perf_counter()
        streamer = TextIteratorStreamer(self.detokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = _Stop()
        outcome: dict[str, Any] = {}
        first_token: list[float] = []
        original_put = streamer.put

        def put(value):  # the first call carries the prompt; the second, the first new token
            if streamer.next_tokens_are_prompt is False and not first_token:
                first_token.append(time.perf_counter() - start)
            original_put(value)

        streamer.put = put

        def run():  # on the generating thread: the vision tower starts while the prompt is tokenized
            try:
                # the vision tower starts early only where the prefill will take it: no video beside the images
                early = self.fast_path_enabled(request.generation) and all(m.kind == "image" for m in request.media)
                prepared = self.prepare([request], on_device=True,
                                        on_images=self.fast.prefill.start if early else None)
                inputs = self.to_device(prepared)
                outcome["prompt_len"] = inputs["input_ids"].shape[1]
                outcome["ids"] = self._generate(inputs, request.generation, streamer, stop, host=prepared)
            except BaseException as exc:  # surfaced in the caller's thread below
                outcome["error"] = exc
                streamer.end()

        if self._streams is None:
            from concurrent.futures import ThreadPoolExecutor

            self._streams = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwen2vl-generate")
        running = self._streams.submit(run)
        stops, held = request.generation.stop, ""
        try:
            for piece in streamer:
                held += piece
                cut = stop_at(held, stops) if stops else None
                if cut is not None:  # a stop string: show what came before it, generate no further
                    held = held[:cut]
                    break
                keep = held_back(held, stops) if stops else 0
                if len(held) > keep:
                    yield TextDelta(held[:len(held) - keep])
                    held = held[len(held) - keep:]
            if held:
                yield TextDelta(held)
        finally:
            stop.event.set()
            running.result()
        if "error" in outcome:
            raise outcome["error"]
        prompt_len = outcome["prompt_len"]
        new_ids = outcome["ids"][0, prompt_len:].tolist()
        yield self._completion(new_ids, prompt_len, request.generation,
                               first_token[0] if first_token else None, time.perf_counter() - start)

    def generate_batch(self, requests: list[ChatRequest], prepared=None, cancelled=None) -> list[Completion]:
        """Answer several requests in one batched generate (the first request's generation options; each
        request's own stop strings).

        `prepared` is `prepare(requests)` done ahead, e.g. on a worker thread while the GPU was busy.
        `cancelled` (anything with is_set()) ends the generation early when it turns true.
        """
        self.load()
        start = time.perf_counter()
        inputs = self.to_device(prepared if prepared is not None else self.prepare(requests))
        prompt_len = inputs["input_ids"].shape[1]
        output = self._generate(inputs, requests[0].generation, stop=_Stop(cancelled) if cancelled else None)
        total = time.perf_counter() - start
        mask = inputs["attention_mask"].tolist()
        rows = output[:, prompt_len:].tolist()
        return [self._completion(ids, int(sum(mask[row])), request.generation, None, total)
                for row, (ids, request) in enumerate(zip(rows, requests))]

    def _completion(self, ids: list[int], prompt_tokens: int, options: GenerationOptions,
                    first_token_s: float | None, total_s: float) -> Completion:
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        for index, token in enumerate(ids):
            if token in eos_ids:
                ids, reason = ids[: index + 1], "stop"
                break
        else:
            reason = "length" if len(ids) >= options.max_new_tokens else "stop"
        text = self.detokenizer.decode(ids, skip_special_tokens=True)
        cut = stop_at(text, options.stop) if options.stop else None
        if cut is not None:  # the answer ends before the stop string; count the tokens up to it
            low, high = 1, len(ids)
            while low < high:  # the shortest prefix whose text reaches the stop string
                middle = (low + high) // 2
                if stop_at(self.detokenizer.decode(ids[:middle], skip_special_tokens=True), options.stop) is None:
                    low = middle + 1
                else:
                    high = middle
            text, ids, reason = text[:cut], ids[:low], "stop"
        return Completion(text, prompt_tokens, len(ids), reason, first_token_s, total_s)


@contextlib.contextmanager
def _after_images(processor, callback):
    """Within it, `processor(...)` calls callback(image_inputs) after processing the images, before it
    tokenizes (transformers' ProcessorMixin does images first; without that step, no call is made)."""
    process = getattr(processor, "_process_images", None)
    if callback is None or process is None:
        yield
        return

    def hooked(*args, **kwargs):
        result = process(*args, **kwargs)
        callback(result[0])
        return result

    processor._process_images = hooked
    try:
        yield
    finally:
        del processor._process_images


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
