"""The prompt's forward pass (the prefill) for the fast path, when one conversation of images and text is
answered: the time to first token of `describe`, `ask` and a served chat.

Same arithmetic as the model's own forward, arranged so that the GPU never waits for the host:
- the vision tower can start from the image processor's output while the prompt is still being tokenized
  (`start`, called by the session),
- the M-RoPE positions and the image tokens' places are worked out on the CPU from the token ids, so
  nothing syncs between the vision tower and the language model,
- the vision tower (per image size) and the language model (per prompt length, rounded up to 64; causal
  attention keeps the padding after a prompt from changing it) are replayed from CUDA graphs once a shape
  comes a second time (a one-off command never pays for a capture), or, in a session, once it came and the
  engine found a moment without work (`capture_pending`: the next one-liner through a session does not pay for
  it either). A graph takes away the host's cost of launching ~400 kernels one by one, which is longer than the
  language model's GPU time.

Batches, videos, flash-attention models and transformers releases without precomputed vision inputs
(`transformers.vision_utils`) keep the model's own forward.
"""

from __future__ import annotations

import inspect
import sys
import threading
from collections import Counter, OrderedDict
from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

GRAPHS_KEPT = 3  # vision graphs (by image size) and text graphs (by prompt length) kept: each holds ~0.1-0.2 GB
TEXT_BUCKET = 64  # text graphs serve prompt lengths rounded up to this
GRAPH_MAX_TOKENS = 4096  # longer prompts and larger images keep the GPU busy without graphs
# the prompt's attention: not cuDNN's, which builds a plan for every new prompt length (36-40 ms on an H100, more than
# the prompt's whole pass), where flash attention has none and takes as long at these lengths
TEXT_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
PENDING_KEPT = 4  # shapes seen once, remembered for a capture when the engine is idle (the latest first)


class Prefill:
    """`applies(inputs)` says whether this prefill serves a batch; `run(inputs, host)` does it. `start` may
    launch the vision tower earlier, while the prompt is still being tokenized."""

    def __init__(self, model, use_graphs: bool) -> None:
        self.model = model
        self.use_graphs = use_graphs
        self.graphs: OrderedDict[tuple, _VisionGraph | _TextGraph] = OrderedDict()
        self.seen: Counter = Counter()
        self.pending: OrderedDict[tuple, Callable] = OrderedDict()  # shapes seen once: their graph's maker
        self.uncaptured: set[tuple] = set()  # shapes whose capture ran out of memory: not tried again
        self.supported = _supported(model)
        self.early: tuple | None = None  # (pixel_values, grid, features) from `start`
        self.lock = threading.Lock()

    @torch.inference_mode()
    def start(self, image_inputs) -> None:
        """The image processor's output for one conversation: run the vision tower now (the GPU works while
        the host tokenizes); `run` picks the features up when its pixel values are these."""
        pixels = image_inputs.get("pixel_values") if hasattr(image_inputs, "get") else None
        if self.supported and pixels is not None and pixels.device == self.model.model.visual.device:
            grid = image_inputs["image_grid_thw"].cpu()
            self.early = (pixels, grid, self._vision(pixels, grid))

    def applies(self, inputs) -> bool:
        return (self.supported and inputs["input_ids"].shape[0] == 1 and inputs.get("pixel_values_videos") is None
                and (inputs.get("pixel_values") is None or inputs.get("mm_token_type_ids") is not None))

    def run(self, inputs, host=None):
        """(logits of the prompt's last token [1, vocab], the prompt's (keys, values) per layer, M-RoPE delta
        [1, 1] (position = index + delta)). `host`: the inputs before their copy to the GPU, where
        token ids are read without waiting for the GPU."""
        model = self.model.model
        host = inputs if host is None else host
        ids, host_ids = inputs["input_ids"], host["input_ids"].cpu()
        length = ids.shape[1]
        pixels = inputs.get("pixel_values")
        if pixels is not None:  # first, so the GPU starts on the vision tower while the host goes on
            grid, features = self._features(pixels, host)
        hidden = model.language_model.embed_tokens(ids)
        if pixels is not None:
            slots = (host_ids[0] == self.model.config.image_token_id).nonzero().squeeze(1)
            if slots.numel() != features.shape[0]:
                raise ValueError(f"Image features and image tokens do not match, tokens: {slots.numel()}, "
                                 f"features: {features.shape[0]}")
            hidden[0].index_copy_(0, _to(slots, ids.device), features.to(hidden.dtype))
        positions, delta = rope_index(self.model, host)
        model.rope_deltas = delta = _to(delta, ids.device)
        size = -(-length // TEXT_BUCKET) * TEXT_BUCKET
        width, dtype, device = hidden.shape[-1], hidden.dtype, hidden.device

        def make():  # holds no tensor of this prompt's: it may be called later, when the engine is idle
            return _TextGraph(self, size, torch.empty((1, size, width), dtype=dtype, device=device))

        with self.lock:
            graph = self._graph(("text", size), hidden, size, make)
            if graph is None:
                return (*self.text(hidden, _to(positions, ids.device)), delta)
            return (*graph(hidden, positions), delta)

    def text(self, hidden, positions, last=None):
        """The language model over the prompt's embeddings (no mask: causal, unpadded, or padded at the end):
        (logits at `last` (default: the last row), each layer's (keys, values)). `positions` [3, 1, L]."""
        language = self.model.model.language_model
        cache = _Keep()
        embeddings = language.rotary_emb(hidden, positions)
        with sdpa_kernel(TEXT_ATTENTION):
            for layer in language.layers:  # the fast layers of fastpath.install_text
                hidden = layer.forward(hidden, position_embeddings=embeddings, past_key_values=cache, use_cache=True)
        tail = hidden[:, -1:] if last is None else hidden.index_select(1, last)
        return self.model.lm_head(language.norm(tail))[:, -1], cache.layers

    def _graph(self, key, example, tokens: int, make):
        """The graph for `key`, captured by `make()` where one is worth it: on CUDA, for a shape that came
        before (a one-off command never pays for a capture), small enough that launching its kernels one
        by one costs more than the graph's memory. A shape seen for the first time is remembered for
        `capture_pending`. None: run without."""
        if not (self.use_graphs and example.is_cuda and tokens <= GRAPH_MAX_TOKENS):
            return None
        if key in self.graphs:
            self.graphs.move_to_end(key)
            return self.graphs[key]
        if key in self.uncaptured:
            return None
        self.seen[key] += 1
        if self.seen[key] < 2:
            self.pending[key] = make
            self.pending.move_to_end(key)
            while len(self.pending) > PENDING_KEPT:
                self.pending.popitem(last=False)
            return None
        self.pending.pop(key, None)
        return self._capture(key, make)

    def capture_pending(self) -> bool:
        """Capture the graph of the latest shape seen once and not captured yet (the engine calls this when it
        has nothing else to do, in a session: the shape's next request replays it). False: none was left."""
        with self.lock:
            while self.pending and self.use_graphs:
                key, make = self.pending.popitem()
                if key not in self.graphs:
                    self._capture(key, make)
                    return True
            return False

    def forget_shapes(self) -> None:
        """Forget the shapes seen so far (not the graphs captured): the load's check ran its probes through here,
        and a session's idle time would otherwise go to capturing their graphs (and the graph slots to them)."""
        with self.lock:
            self.seen.clear()
            self.pending.clear()

    def _capture(self, key, make):
        try:
            graph = make()
        except RuntimeError as exc:
            if out_of_memory(exc):  # no room for this graph now: its shape runs without one, the others keep theirs
                self.uncaptured.add(key)
                torch.cuda.empty_cache()
                return None
            # a capture this GPU or build cannot do: stay correct without graphs
            self.use_graphs = False
            self.pending.clear()
            print(f"qwen2vl: warning: CUDA graphs unavailable for prompts ({str(exc).splitlines()[0]}); "
                  "running without", file=sys.stderr)
            return None
        kind = [k for k in self.graphs if k[0] == key[0]]
        if len(kind) >= GRAPHS_KEPT:
            del self.graphs[kind[0]]
        self.graphs[key] = graph
        return graph

    def _features(self, pixels, host):
        """(grid on the CPU, the vision tower's features): those `start` made for these pixels, or new ones."""
        early = self.early
        if early is not None and early[0] is pixels:
            self.early = None
            return early[1], early[2]
        grid = host["image_grid_thw"].cpu()
        return grid, self._vision(pixels, grid)

    def _vision(self, pixel_values, grid):
        """The vision tower's merged features [image tokens, hidden], from a graph once the size comes again."""
        with self.lock:
            return self._vision_locked(pixel_values, grid)

    def _vision_locked(self, pixel_values, grid):
        from transformers import vision_utils

        visual = self.model.model.visual
        pixel_values = pixel_values.to(visual.dtype)
        key = ("vision", tuple(map(tuple, grid.tolist())))
        positions = _to(vision_utils.get_vision_position_ids(grid, visual.spatial_merge_size), pixel_values.device)
        cu_seqlens = vision_utils.get_vision_cu_seqlens(grid)

        def tower(pixels):  # precomputed positions and boundaries (on the CPU) keep it free of host syncs
            return visual(pixels, grid_thw=grid, position_ids=positions, cu_seqlens=cu_seqlens).pooler_output

        tokens = pixel_values.shape[0] // visual.spatial_merge_size ** 2
        shape, dtype, device = pixel_values.shape, pixel_values.dtype, pixel_values.device

        def make():  # holds no tensor of this image's (see run)
            return _VisionGraph(tower, torch.zeros(shape, dtype=dtype, device=device), positions)

        graph = self._graph(key, pixel_values, tokens, make)
        return tower(pixel_values) if graph is None else graph(pixel_values)


class _Keep:
    """A cache for a prompt's one forward: keeps each layer's keys and values as they are (no copies)."""

    def __init__(self) -> None:
        self.layers: list[tuple] = []

    def update(self, keys, values, layer_idx, *args, **kwargs):
        self.layers.append((keys, values))
        return keys, values


class _VisionGraph:
    """The vision tower for one image size, captured once (static input and output buffers)."""

    def __init__(self, tower, example, positions) -> None:
        self.pixels, self.positions = example.clone(), positions  # the graph reads both
        self.graph, self.out = captured(lambda: tower(self.pixels), example.device)

    def __call__(self, pixel_values):
        self.pixels.copy_(pixel_values)
        self.graph.replay()
        return self.out.clone()  # the graph's own buffer is overwritten by its next replay


class _TextGraph:
    """The language model for prompts of up to `size` tokens (batch 1), captured once. The prompt goes in at
    the start of static buffers; the rows after it are padding, which causal attention keeps from the
    prompt's rows, so the prompt's logits and keys/values are what an unpadded forward gives."""

    def __init__(self, prefill: Prefill, size: int, example) -> None:
        device = example.device
        self.hidden = torch.zeros((1, size, example.shape[-1]), dtype=example.dtype, device=device)
        self.positions = torch.zeros((3, 1, size), dtype=torch.long, device=device)
        self.last = torch.zeros(1, dtype=torch.long, device=device)
        self.graph, (self.logits, self.kv) = captured(lambda: prefill.text(self.hidden, self.positions, self.last),
                                                       device)

    def __call__(self, hidden, positions):
        """(logits [1, vocab], (keys, values) per layer: views of the graph's buffers, valid until its next
        replay) for the prompt's embeddings [1, L, hidden] and positions [3, 1, L] (CPU)."""
        length = hidden.shape[1]
        self.hidden[:, :length].copy_(hidden)
        self.positions[..., :length].copy_(_to(positions, hidden.device))
        self.last.fill_(length - 1)
        self.graph.replay()
        return self.logits.clone(), [(k[:, :, :length], v[:, :, :length]) for k, v in self.kv]


def out_of_memory(exc: BaseException | None) -> bool:
    """`exc` is, or was raised while handling, an out-of-memory error (a capture's end can fail after one)."""
    while exc is not None:
        if isinstance(exc, torch.OutOfMemoryError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def captured(fn, device):
    """(a CUDA graph of fn(), fn's outputs in the graph's memory), after one eager run of fn on a side
    stream, as capture requires (that run's effects stay). Thread-local capture: the batch runner's producer
    thread keeps preparing images on the GPU (host-to-device copies on its own stream) meanwhile, which the
    default global mode counts as an error in the capture."""
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = fn()
    return graph, out


def rope_index(model, host):
    """(M-RoPE positions [3, B, L], delta [B, 1]) of a prepared prompt batch, on the CPU: the one place that
    numbers prompts, for the prefill, the batched forward and the decoding after both (a new token's position
    is its index + delta). transformers' own get_rope_index, from the host copy of the token ids; a prompt
    without images or videos gets text positions from it too (counted over real tokens, as `generate` does)."""
    ids = host["input_ids"].cpu()
    types = host.get("mm_token_type_ids")
    types = torch.zeros_like(ids) if types is None else types.cpu()
    grids = {key: host[key].cpu() for key in ("image_grid_thw", "video_grid_thw") if host.get(key) is not None}
    attention = host.get("attention_mask")
    positions, delta = model.model.get_rope_index(ids, types, attention_mask=None if attention is None else attention.cpu(),
                                                  **grids)
    return positions.contiguous(), delta.reshape(-1, 1).contiguous()


def _to(tensor, device):
    """A small CPU tensor on `device` without blocking the host (pinned first where that helps; pinning needs
    a tensor of its own memory, not an expanded view)."""
    if device.type == "cuda":
        tensor = tensor.contiguous().pin_memory()
    return tensor.to(device, non_blocking=True)


def _supported(model) -> bool:
    """This transformers takes precomputed vision positions, and the fast vision and text layers are in."""
    try:
        from transformers import vision_utils  # noqa: F401 - transformers >= 5.x with precomputable vision inputs

        source = inspect.getsource(type(model.model.visual).forward)
    except (ImportError, OSError, TypeError, AttributeError):  # an older transformers, another model layout
        return False
    return ("kwargs=kwargs" in source and getattr(model.model.visual, "_qwen2vl_fast", False)
            and getattr(model.model.language_model, "_qwen2vl_fast", False))
