"""The GPU fast path for Qwen2-VL, over the loaded model's own weights:

- FastDecoder: the prompt's forward and a greedy decode step over a static KV cache, with fused QKV and
  gate/up projections and the fused kernels of kernels.py; `enable` puts it on a model and checks it.
- Rows: the running batch the engine (engine/scheduler.py) decodes: requests join and leave between steps;
  on CUDA a step is one CUDA graph that feeds itself (next token, position, cache slot), replayed while the
  host reads tokens a few steps behind.
- install_vision / install_text: the vision tower and the language model's layers, same arithmetic with
  fewer kernels and no host syncs, used by every forward (the prefill, and `generate` when it runs).

It follows HF's arithmetic (RMSNorm in float32, RoPE cos/sin in float32 cast to the model dtype, text
positions plus rope_deltas), so greedy answers equal `model.generate`'s: tests check that in float32 on
the CPU, the GPU suite (tests/gpu) on CUDA. Sampling and repetition penalties stay on `generate`.

It reaches into transformers' internals (layer forwards, the cache, M-RoPE positions), which change between
releases. So the contract is checked where it matters, at load: `enable` runs a few probe prompts
through the stock model and through the fast path, and where the logits differ (or anything fails) it takes
its patches off and raises ContractError; the session then answers with the stock code. Never a wrong answer.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import kernels
from .prefill import Prefill, captured, out_of_memory, rope_index

CACHE_BLOCK = 256  # cache lengths are rounded up to this
AHEAD = 2  # decode steps queued on the GPU before the host reads one: absorbs host stalls (GIL, I/O)
# the contract check's largest relative error of logits, {float32: ..., half precision: ...}. Rounding: 0 on the
# CPU in float32; 0.003-0.036 in bf16 on the H100 (random-weight 2B). A cache left empty: see tests/gpu.
CONTRACT_TOLERANCE = {True: 1e-3, False: 0.25}


class ContractError(RuntimeError):
    """transformers' model or processor does not behave as the fast path expects: use the stock code."""


def enable(model, probes=(), use_graphs: bool | None = None) -> "FastDecoder":
    """Put the fast path on `model` (fused weights, fast vision and text layers), then check the contract with
    transformers on `probes` (pairs of inputs on the device and as prepared): on each, the prompt's logits and the
    next step's must be the stock model's. Where they are not, or the check fails, the patches come off and
    ContractError says why. No probes, no check: the session gives none where one passed before (checks.py)."""
    decoder = FastDecoder(model, use_graphs)
    cache_arg = decoder.cache_arg
    references = [_reference(model, inputs, cache_arg) for inputs, _ in probes]  # the stock code, before patching
    decoder.install()
    try:
        for (inputs, host), reference in zip(probes, references):
            decoder.errors.append(decoder._check(inputs, host, reference))
    except Exception as exc:  # noqa: BLE001 - any failure here means the contract is not the one we know
        uninstall(model)
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ContractError(f"{type(exc).__name__}: {first}") from exc
    decoder.prefill.forget_shapes()  # the probes' image sizes and prompt lengths are not the requests' to come
    tolerance = CONTRACT_TOLERANCE[decoder.dtype == torch.float32]
    if decoder.errors and max(decoder.errors) > tolerance:
        uninstall(model)
        raise ContractError(f"its answers differ from transformers' (relative error {max(decoder.errors):.2g} "
                            f"> {tolerance:g})")
    return decoder


class FastDecoder:
    """The fast path's parts over a loaded Qwen2VLForConditionalGeneration: the prompt's forward (`_prefill`) and
    one greedy decode step over a static cache (`_step`), which Rows runs for a batch. Made by `enable`."""

    def __init__(self, model, use_graphs: bool | None = None) -> None:
        import inspect

        self.model = model
        text = model.config.text_config
        self.language = model.model.language_model
        self.heads, self.kv_heads = text.num_attention_heads, text.num_key_value_heads
        self.head_dim = text.hidden_size // text.num_attention_heads
        self.layer_count = text.num_hidden_layers
        self.eps = text.rms_norm_eps
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        self.inv_freq = self.language.rotary_emb.inv_freq.float().to(self.device)
        # newer transformers (5.24) call the forward's past_key_values `cache` (the old name is deprecated)
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.layers: list[dict] = []
        self.prefill: Prefill | None = None
        self.errors: list[float] = []  # per probe: the larger relative error of its two logits
        self.checked_before = False  # the session's: the errors are those of an earlier load's check
        self.quantized = {True: 0, False: 0}  # quantized projections by whether the fused kernel runs them

    def install(self) -> None:
        """Fuse the projections and put the fast vision and text layers in (every forward uses them)."""
        self.layers = [self._fuse(layer) for layer in self.language.layers]
        head = self.model.lm_head
        plain = isinstance(head, torch.nn.Linear) and head.weight.is_floating_point()
        self.head = functools.partial(kernels.linear, weight=head.weight, bias=head.bias) if plain else head
        install_vision(self.model)
        install_text(self.model, self.layers)
        self.prefill = Prefill(self.model, self.use_graphs)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layer_count * self.kv_heads * self.head_dim * self.dtype.itemsize

    @torch.inference_mode()
    def _check(self, inputs, host, reference) -> float:
        """The fast path's prefill and first decode step on one probe, against the stock model's logits."""
        logits, prompt_kv, delta = self._prefill(inputs, host)
        attention = inputs["attention_mask"]
        rows = Rows(self, attention.shape[0], CACHE_BLOCK, {-1}, 0)
        rows.join(prompt_kv, attention, reference["next"], attention.sum(-1) + delta.reshape(-1))
        second = self._step_logits(rows.tokens, rows.positions, rows.slot, rows.keys, rows.values, rows.mask)
        return max(_relative(logits, reference["logits"]), _relative(second, reference["second"]))

    def _fuse(self, layer) -> dict:
        """A layer's norms and projections, each projection a function of its input: over one weight for q/k/v
        and one for gate/up (the HF modules keep views of them: no extra memory), or, for quantized layers
        (GPTQ, AWQ), quantized.fuse's: a fused dequantizing kernel for decode steps on CUDA, the modules' own
        forwards (their library's kernels) for prompts."""
        attn, mlp = layer.self_attn, layer.mlp
        norms = {"norm1": layer.input_layernorm.weight, "norm2": layer.post_attention_layernorm.weight}
        projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if not all(isinstance(m, torch.nn.Linear) and m.weight.is_floating_point() for m in projections):
            from .quantized import fuse

            fused = {"qkv": fuse([attn.q_proj, attn.k_proj, attn.v_proj]), "o": fuse([attn.o_proj]),
                     "gate_up": fuse([mlp.gate_proj, mlp.up_proj]), "down": fuse([mlp.down_proj])}
            for group in fused.values():
                self.quantized[group.probe() if self.device.type == "cuda" else False] += len(group.modules)
            return {**fused, **norms}
        with torch.no_grad():
            qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
            bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            q, k = attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0]
            attn.q_proj.weight = torch.nn.Parameter(qkv[:q], requires_grad=False)
            attn.k_proj.weight = torch.nn.Parameter(qkv[q:q + k], requires_grad=False)
            attn.v_proj.weight = torch.nn.Parameter(qkv[q + k:], requires_grad=False)
            attn.q_proj.bias = torch.nn.Parameter(bias[:q], requires_grad=False)
            attn.k_proj.bias = torch.nn.Parameter(bias[q:q + k], requires_grad=False)
            attn.v_proj.bias = torch.nn.Parameter(bias[q + k:], requires_grad=False)
            inter = mlp.gate_proj.weight.shape[0]
            mlp.gate_proj.weight = torch.nn.Parameter(gate_up[:inter], requires_grad=False)
            mlp.up_proj.weight = torch.nn.Parameter(gate_up[inter:], requires_grad=False)
        return {"qkv": functools.partial(kernels.linear, weight=qkv, bias=bias),
                "o": functools.partial(kernels.linear, weight=attn.o_proj.weight),
                "gate_up": functools.partial(kernels.linear, weight=gate_up),
                "down": functools.partial(kernels.linear, weight=mlp.down_proj.weight), **norms}

    # ---- one decode step (pure tensor work: capturable) -----------------------------------------
    def _step(self, tokens, positions, slot, keys, values, mask):
        """tokens [B], positions [B], slot [B] -> next greedy tokens [B]; writes each row's K/V at its `slot`."""
        return self._step_logits(tokens, positions, slot, keys, values, mask).argmax(-1)

    def _step_logits(self, tokens, positions, slot, keys, values, mask):
        """One decode step's logits [B, vocab] (see _step).

        `mask` is additive ([B, 1, 1, size]: 0 where visible, -inf elsewhere); each row's slot opens.
        """
        batch = tokens.shape[0]
        mask.scatter_(3, slot.view(batch, 1, 1, 1), 0.0)
        hidden, delta = self.language.embed_tokens(tokens), None
        q_size, groups = self.heads * self.head_dim, self.heads // self.kv_heads
        for index, w in enumerate(self.layers):
            hidden, x = kernels.add_rms_norm(hidden, delta, w["norm1"], self.eps, inplace=True)
            qkv = w["qkv"](x)
            q = kernels.rope_store(qkv, positions, self.inv_freq, slot, keys[index], values[index],
                                   self.heads, self.kv_heads)
            # the query heads sharing one K/V head become that head's query rows: no K/V copies
            grouped = q.view(batch, self.kv_heads, groups, self.head_dim)
            attended = kernels.decode_attention(grouped, keys[index], values[index], mask, slot)
            hidden, x = kernels.add_rms_norm(hidden, w["o"](attended.reshape(batch, q_size)),
                                             w["norm2"], self.eps, inplace=True)
            delta = w["down"](kernels.silu_mul(w["gate_up"](x)))
        _, x = kernels.add_rms_norm(hidden, delta, self.language.norm.weight, self.eps)
        return self.head(x)

    def _prefill(self, inputs, host=None):
        """The prompt's forward: (logits of its last token [B, vocab], (keys, values) per layer, M-RoPE delta
        [B, 1]: a new token's position is its index + delta). One conversation takes prefill.Prefill; a batch
        (or a video) the model's own forward, given the positions that decoding goes on from (rope_index)."""
        if self.prefill.applies(inputs):
            return self.prefill.run(inputs, host)
        from transformers import DynamicCache

        positions, delta = rope_index(self.model, inputs if host is None else host)
        cache = DynamicCache(config=self.model.config)
        logits = self.model(**inputs, position_ids=positions.to(self.device), use_cache=True, logits_to_keep=1,
                            **{self.cache_arg: cache}).logits[:, -1]
        return logits, [(layer.keys, layer.values) for layer in cache.layers], delta.to(self.device)

@torch.inference_mode()
def _reference(model, inputs, cache_arg: str) -> dict:
    """The stock model on a probe: the prompt's last logits, its greedy next token, and the logits after that
    token (one forward over the longer prompt, which is what a correct cache must reproduce)."""
    from transformers import DynamicCache

    logits = model(**inputs, use_cache=True, **{cache_arg: DynamicCache(config=model.config)}).logits[:, -1]
    token = logits.argmax(-1)
    longer, column = dict(inputs), token[:, None]
    extra = {"input_ids": column, "attention_mask": torch.ones_like(column), "mm_token_type_ids": torch.zeros_like(column)}
    for key, value in extra.items():
        if key in inputs:
            longer[key] = torch.cat([inputs[key], value.to(inputs[key].dtype)], dim=1)
    second = model(**longer).logits[:, -1]
    model.model.rope_deltas = None  # no state of the probe's is left for the next forward
    return {"logits": logits, "next": token, "second": second}


def _relative(value, reference) -> float:
    value, reference = value.float(), reference.float()
    return float((value - reference).norm() / reference.norm().clamp_min(1e-12))


def uninstall(model) -> None:
    """Put the stock forwards back (the fused weights stay: the HF modules hold views of them, same values)."""
    visual, language = model.model.visual, model.model.language_model
    for module in (visual.patch_embed, *visual.blocks, *language.layers):
        module.__dict__.pop("forward", None)
    visual._qwen2vl_fast = language._qwen2vl_fast = False


def install_text(model, fused: list[dict]) -> None:
    """The language model's layers with the fused kernels: one QKV and one gate/up product, rotary and the
    split into heads in one kernel, residual add and RMSNorm in one, SiLU*mul in one. Same arithmetic as
    HF's layer (which it replaces for every forward: the prefill, and `generate` when it is used)."""
    import inspect
    import types

    from transformers.models.qwen2_vl import modeling_qwen2_vl as stock

    language = model.model.language_model
    layers = language.layers
    try:
        returns_tensor = inspect.getsource(type(layers[0]).forward).rstrip().endswith("return hidden_states")
    except (OSError, TypeError):  # no source to read: assume nothing
        returns_tensor = False
    if (getattr(language, "_qwen2vl_fast", False) or stock.is_flash_attention_requested(language.config)
            or not returns_tensor):
        return  # another layer contract than the one this mirrors: keep the stock code
    text = model.config.text_config
    section = _mrope_section(text)
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    merged: dict = {}  # the forward's cos/sin (one pair shared by all layers) -> M-RoPE sections merged

    def rope(cos, sin):
        if cos.dim() == 3:  # transformers that merge the sections in the rotary module already
            return cos, sin
        if merged.get("key") is not cos:
            pick = lambda t: torch.cat([m[i % 3] for i, m in enumerate(t.split(section * 2, dim=-1))], -1)  # noqa: E731
            merged.update(key=cos, value=(pick(cos), pick(sin)))
        return merged["value"]

    for layer, w in zip(layers, fused):
        original = layer.forward

        def forward(self, hidden_states, *args, _original=original, _w=w, **kwargs):
            embeddings = kwargs.get("position_embeddings")
            if args or embeddings is None or (embeddings[0].dim() == 4 and not section):
                return _original(hidden_states, *args, **kwargs)  # a call this does not mirror
            store = kwargs.get("cache")  # newer transformers (5.24); before, past_key_values
            store = kwargs.get("past_key_values") if store is None else store
            attention_mask = kwargs.get("attention_mask")
            attention = self.self_attn
            batch, length, _ = hidden_states.shape
            eps = self.input_layernorm.variance_epsilon
            _, x = kernels.add_rms_norm(hidden_states, None, _w["norm1"], eps)
            q, k, v = kernels.rope_prefill(_w["qkv"](x), *rope(*embeddings), heads, kv_heads)
            if store is not None:
                k, v = store.update(k, v, attention.layer_idx)
            if attention_mask is None:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=length > 1, scale=attention.scaling,
                                                     enable_gqa=heads != kv_heads)
            else:
                if attention_mask.dtype != torch.bool and attention_mask.dtype != q.dtype:
                    attention_mask = attention_mask.to(q.dtype)
                k, v = (stock.repeat_kv(t, heads // kv_heads) for t in (k, v))
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask[..., :k.shape[-2]],
                                                     scale=attention.scaling)
            out = _w["o"](out.transpose(1, 2).reshape(batch, length, -1))
            hidden_states, x = kernels.add_rms_norm(hidden_states, out, _w["norm2"], eps)
            return hidden_states + _w["down"](kernels.silu_mul(_w["gate_up"](x)))

        layer.forward = types.MethodType(forward, layer)
    language._qwen2vl_fast = True


def _mrope_section(text_config) -> list[int]:
    for name in ("rope_parameters", "rope_scaling"):
        value = getattr(text_config, name, None)
        if isinstance(value, dict) and value.get("mrope_section"):
            return list(value["mrope_section"])
    return []


def install_vision(model) -> None:
    """A faster vision tower over the same weights, same arithmetic:
      - the patch embedding (a Conv3d whose stride equals its kernel) as one matrix product,
      - per block, q/k rotation and the split into heads in one kernel, QuickGELU in one kernel,
      - one attention call over all images when they have the same size (the batch runner sorts by
        size), and no host sync per block (the stock SDPA path reads the image lengths in every block).
    Flash-attention models and unknown block layouts keep the stock code.
    """
    import types

    from transformers.models.qwen2_vl import modeling_qwen2_vl as stock

    visual = model.model.visual
    if getattr(visual, "_qwen2vl_fast", False) or stock.is_flash_attention_requested(visual.config):
        return
    embed = visual.patch_embed
    if isinstance(embed.proj, torch.nn.Conv3d) and tuple(embed.proj.kernel_size) == tuple(embed.proj.stride):
        def embed_forward(self, hidden_states):
            weight = self.proj.weight
            return F.linear(hidden_states.reshape(-1, weight[0].numel()).to(weight.dtype), weight.reshape(weight.shape[0], -1))

        embed.forward = types.MethodType(embed_forward, embed)
    lengths: dict = {}  # cu_seqlens (one tensor per forward, shared by all blocks) -> image lengths

    for block in visual.blocks:
        original = block.forward
        quick = type(block.mlp.act).__name__ == "QuickGELUActivation"

        def forward(self, hidden_states, cu_seqlens, position_embeddings=None, *, _original=original,
                    _quick=quick, **kwargs):
            if position_embeddings is None:
                return _original(hidden_states, cu_seqlens, position_embeddings=position_embeddings, **kwargs)
            if lengths.get("key") is not cu_seqlens:
                lengths.update(key=cu_seqlens, value=(cu_seqlens[1:] - cu_seqlens[:-1]).tolist())
            sizes = lengths["value"]
            attention, total = self.attn, hidden_states.shape[0]
            x = self.norm1(hidden_states)
            qkv = F.linear(x, attention.qkv.weight, attention.qkv.bias)
            same = len(set(sizes)) == 1
            q, k, v = kernels.vision_qkv(qkv, *position_embeddings, attention.num_heads, sizes[0] if same else None)
            if same:  # [images, heads, length, hd]
                out = F.scaled_dot_product_attention(q, k, v, scale=attention.scaling).transpose(1, 2)
            else:  # [1, heads, all patches, hd], attended image by image
                parts, begin = [], 0
                for size in sizes:
                    end = begin + size
                    parts.append(F.scaled_dot_product_attention(q[:, :, begin:end], k[:, :, begin:end],
                                                                v[:, :, begin:end], scale=attention.scaling))
                    begin = end
                out = torch.cat(parts, dim=2).transpose(1, 2)
            hidden_states = hidden_states + attention.proj(out.reshape(total, -1))
            mlp = self.mlp
            x = mlp.fc1(self.norm2(hidden_states))
            x = kernels.quick_gelu(x) if _quick else mlp.act(x)
            return hidden_states + mlp.fc2(x)

        block.forward = types.MethodType(forward, block)
    visual._qwen2vl_fast = True


class Rows:
    """The running batch: a static K/V cache of `capacity` rows x `size` positions, each row with its own
    length (`slot`: where its next K/V goes). A prefilled request joins between steps in the first free row
    (its prompt's K/V copied in) and leaves when it is done; the last row in use then moves into its place, so
    the rows in use are always 0..count-1. A step runs over the smallest power of two of rows that covers them,
    replayed from a CUDA graph per such count, and feeds itself: next token, position and slot advance on the
    GPU, and a row that has produced an end token gets the pad token from then on (as in `generate`)."""

    def __init__(self, decoder: FastDecoder, capacity: int, size: int, eos_ids: set[int], pad_id: int) -> None:
        self.decoder, self.capacity, self.size = decoder, capacity, size
        shape = (capacity, decoder.kv_heads, size, decoder.head_dim)
        device, dtype = decoder.device, decoder.dtype
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(decoder.layer_count)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(decoder.layer_count)]
        self.mask = torch.full((capacity, 1, 1, size), float("-inf"), device=device, dtype=dtype)
        self.tokens = torch.zeros(capacity, device=device, dtype=torch.long)
        self.positions = torch.zeros(capacity, device=device, dtype=torch.long)
        self.slot = torch.zeros(capacity, device=device, dtype=torch.long)
        self.finished = torch.ones(capacity, device=device, dtype=torch.bool)
        self.eos = torch.tensor(sorted(eos_ids), device=device)
        self.pad = torch.tensor(pad_id, device=device)
        self.count = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.uncaptured: set[int] = set()  # row counts whose capture ran out of memory: stepped without a graph

    def join(self, prompt_kv, attention, first, positions) -> range:
        """Rows for a prefilled group: its (keys, values) per layer, attention mask [B, L] (left padding), first
        tokens [B] and the positions they take [B]."""
        batch, length = attention.shape
        rows = slice(self.count, self.count + batch)
        for index, (keys, values) in enumerate(prompt_kv):
            self.keys[index][rows, :, :length].copy_(keys[:, :, :length])
            self.values[index][rows, :, :length].copy_(values[:, :, :length])
        self.mask[rows].fill_(float("-inf"))
        self.mask[rows, 0, 0, :length].masked_fill_(attention.bool(), 0.0)
        self.tokens[rows].copy_(first)
        self.finished[rows].copy_((first[:, None] == self.eos).any(-1))
        self.positions[rows].copy_(positions)
        self.slot[rows].fill_(length)
        self.count += batch
        return range(rows.start, rows.stop)

    def leave(self, row: int) -> None:
        """Free `row`: the last row in use moves into it (cache, mask and step inputs: all on the GPU)."""
        last = self.count - 1
        if row != last:
            for buffers in (self.keys, self.values):
                for layer in buffers:
                    layer[row].copy_(layer[last])
            for buffer in (self.mask, self.tokens, self.positions, self.slot, self.finished):
                buffer[row].copy_(buffer[last])
        self.finished[last] = True  # a row past the ones in use may still be stepped: it writes at slot 0
        self.slot[last] = 0
        self.count -= 1

    def bucket(self) -> int:
        """The rows a step runs over: the smallest power of two covering the rows in use."""
        return min(self.capacity, 1 << max(0, self.count - 1).bit_length())

    def _advance(self, bucket: int) -> None:
        rows = slice(0, bucket)
        tokens, positions, slot, finished = (t[rows] for t in (self.tokens, self.positions, self.slot, self.finished))
        token = self.decoder._step(tokens, positions, slot, [k[rows] for k in self.keys],
                                   [v[rows] for v in self.values], self.mask[rows])
        token = torch.where(finished, self.pad, token)
        finished |= (token[:, None] == self.eos).any(-1)
        tokens.copy_(token)
        positions += 1
        slot.copy_((slot + 1).clamp_(max=self.size - 1))  # only rows out of use get there (admission sees to it)

    def will_capture(self) -> bool:
        """The next step captures its graph first (tens of ms; once per row count)."""
        bucket = self.bucket()
        return self.decoder.use_graphs and bucket not in self.graphs and bucket not in self.uncaptured

    def step(self, host_row):
        """Run one step and copy its tokens into `host_row` [capacity]; returns the event to wait on (None on
        the CPU) and the rows it ran over."""
        bucket = self.bucket()
        if self.will_capture():
            self._capture(bucket)  # where that fails, graphs are off from here on (out of memory: this count's)
        if not self.decoder.use_graphs or bucket not in self.graphs:
            self._advance(bucket)
            host_row[:bucket].copy_(self.tokens[:bucket])
            return None, bucket
        self.graphs[bucket].replay()
        host_row[:bucket].copy_(self.tokens[:bucket], non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return event, bucket

    def _capture(self, bucket: int) -> None:
        """Record the step (after prefill.captured's warm-up, which writes the K/V and mask of the step about
        to run: harmless), then put the inputs the warm-up moved on back. Where this GPU or build cannot
        capture it: one warning, and graphs off for the decoder; where it runs out of memory: this row count
        steps without a graph in this batch (a larger batch is a new one, and tries again), the others keep theirs."""
        buffers = (self.tokens, self.positions, self.slot, self.finished)
        saved = [t.clone() for t in buffers]
        try:
            self.graphs[bucket], _ = captured(lambda: self._advance(bucket), self.tokens.device)
        except RuntimeError as exc:
            import sys

            if out_of_memory(exc):
                self.uncaptured.add(bucket)
                torch.cuda.empty_cache()
                return
            self.decoder.use_graphs = False
            print(f"qwen2vl: warning: CUDA graphs unavailable for decoding ({str(exc).splitlines()[0]}); "
                  "running without", file=sys.stderr)
        finally:
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)
