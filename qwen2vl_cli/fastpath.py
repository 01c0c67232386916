"""Fast greedy decoding for Qwen2-VL: HF's own forward for the prefill (vision tower, M-RoPE, the
prompt), then a decode step written against the same weights with a static KV cache, fused QKV and
gate/up projections, grouped-query attention without copying K/V, and, on CUDA, the whole step
captured once in a CUDA graph and replayed for every token.

It follows HF's arithmetic (RMSNorm in float32, RoPE cos/sin in float32 cast to the model dtype, text
positions plus rope_deltas), so greedy answers equal `model.generate`'s; tests check that in float32.
Sampling and repetition penalties stay on `generate`.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

CACHE_BLOCK = 256  # cache lengths are rounded up to this, so graphs are reused across prompts
CHECK_EVERY = 8  # batched decoding looks for "all rows finished" every this many steps


class FastDecoder:
    """Greedy decoding over a loaded Qwen2VLForConditionalGeneration; `generate` mirrors HF's contract."""

    def __init__(self, model, use_graphs: bool | None = None) -> None:
        self.model = model
        text = model.config.text_config
        self.language = model.model.language_model
        self.heads, self.kv_heads = text.num_attention_heads, text.num_key_value_heads
        self.head_dim = text.hidden_size // text.num_attention_heads
        self.eps = text.rms_norm_eps
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        self.inv_freq = self.language.rotary_emb.inv_freq.float().to(self.device)
        self.layers = [self._fuse(layer) for layer in self.language.layers]
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.lock = threading.Lock()
        batch_vision_attention(model)

    def _fuse(self, layer) -> dict:
        """One weight for q/k/v and one for gate/up; the HF modules keep views of them (no extra memory)."""
        attn, mlp = layer.self_attn, layer.mlp
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
        return {"qkv": qkv, "bias": bias, "o": attn.o_proj.weight, "gate_up": gate_up, "down": mlp.down_proj.weight,
                "norm1": layer.input_layernorm.weight, "norm2": layer.post_attention_layernorm.weight}

    # ---- one decode step (pure tensor work: capturable) -----------------------------------------
    def _rms(self, x, weight):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return weight * (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype)

    @staticmethod
    def _rotate(x, cos, sin):
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def _step(self, tokens, positions, slot, keys, values, mask):
        """tokens [B], positions [B], slot [1] -> next greedy tokens [B]; writes K/V at `slot`."""
        batch = tokens.shape[0]
        mask.index_fill_(3, slot, True)
        hidden = self.language.embed_tokens(tokens)[:, None, :]
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
        cos, sin = angles.cos().to(self.dtype), angles.sin().to(self.dtype)
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        groups = self.heads // self.kv_heads
        for index, w in enumerate(self.layers):
            x = self._rms(hidden, w["norm1"])
            qkv = F.linear(x, w["qkv"], w["bias"])
            q = qkv[..., :q_size].view(batch, 1, self.heads, self.head_dim).transpose(1, 2)
            k = qkv[..., q_size:q_size + kv_size].view(batch, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            v = qkv[..., q_size + kv_size:].view(batch, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            keys[index].index_copy_(2, slot, k)
            values[index].index_copy_(2, slot, v)
            # the query heads sharing one K/V head become that head's query rows: no K/V copies
            grouped = q.reshape(batch, self.kv_heads, groups, self.head_dim)
            attended = F.scaled_dot_product_attention(grouped, keys[index], values[index], attn_mask=mask)
            hidden = hidden + F.linear(attended.reshape(batch, 1, q_size), w["o"])
            x = self._rms(hidden, w["norm2"])
            gate, up = F.linear(x, w["gate_up"]).chunk(2, dim=-1)
            hidden = hidden + F.linear(F.silu(gate) * up, w["down"])
        hidden = self._rms(hidden, self.language.norm.weight)
        return self.model.lm_head(hidden)[:, 0].argmax(-1)

    # ---- generation ------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, inputs, max_new_tokens: int, eos_ids: set[int], pad_id: int, streamer=None,
                 stop: threading.Event | None = None):
        """Greedy tokens after the prompt, as `model.generate` returns them: [B, L + new], pad after EOS."""
        from transformers import DynamicCache

        with self.lock:
            input_ids, attention = inputs["input_ids"], inputs["attention_mask"]
            batch, length = input_ids.shape
            cache = DynamicCache(config=self.model.config)
            out = self.model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1)
            if streamer is not None:
                streamer.put(input_ids.cpu())
            size = -(-(length + max_new_tokens) // CACHE_BLOCK) * CACHE_BLOCK
            graph = self._graph_for(batch, size)
            graph.load(cache, attention, length)
            positions = attention.sum(-1) + self.model.model.rope_deltas.reshape(-1).to(attention.device)
            eos = torch.tensor(sorted(eos_ids), device=self.device)
            finished = torch.isin(token, eos)
            produced = [token]
            if streamer is not None:
                streamer.put(token.cpu())
            for step in range(max_new_tokens - 1):
                if stop is not None and stop.is_set():
                    break
                if streamer is not None or step % CHECK_EVERY == 0:
                    if bool(finished.all()):
                        break
                token = graph.run(token, positions + step, length + step)
                token = torch.where(finished, torch.full_like(token, pad_id), token)
                finished |= torch.isin(token, eos)
                produced.append(token)
                if streamer is not None:
                    streamer.put(token.cpu())
            if streamer is not None:
                streamer.end()
            return torch.cat([input_ids, torch.stack(produced, dim=1)], dim=1)

    def _graph_for(self, batch: int, size: int) -> "_Graph":
        key = (batch, size)
        if key not in self.graphs:
            if len(self.graphs) >= 2:  # bound the memory held by caches of earlier shapes
                self.graphs.pop(next(iter(self.graphs)))
            self.graphs[key] = _Graph(self, batch, size)
        return self.graphs[key]


def batch_vision_attention(model) -> None:
    """Vision attention over same-sized images in one SDPA call instead of one call per image.

    The stock SDPA path splits the packed patches per image (cu_seqlens) and loops; batches from
    `qwen2vl batch` are sorted by size, so their images usually have equal lengths and can be stacked.
    Other cases (one image, mixed sizes, flash-attention) keep the stock code.
    """
    import types

    from transformers.models.qwen2_vl import modeling_qwen2_vl as stock

    for block in model.model.visual.blocks:
        attention = block.attn
        if getattr(attention, "_qwen2vl_batched", False):
            continue
        original = attention.forward

        def forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, *,
                    _original=original, **kwargs):
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
            if (len(lengths) < 2 or len(set(lengths)) != 1 or position_embeddings is None
                    or stock.is_flash_attention_requested(self.config)):
                return _original(hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
            total, count, length = hidden_states.shape[0], len(lengths), lengths[0]
            q, k, v = self.qkv(hidden_states).reshape(total, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = stock.apply_rotary_pos_emb_vision(q, k, *position_embeddings)
            q, k, v = (x.reshape(count, length, self.num_heads, -1).transpose(1, 2) for x in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scaling)
            return self.proj(out.transpose(1, 2).reshape(total, -1))

        attention.forward = types.MethodType(forward, attention)
        attention._qwen2vl_batched = True


class _Graph:
    """Static buffers (cache, mask, inputs) for one (batch, cache length), and the captured step."""

    def __init__(self, decoder: FastDecoder, batch: int, size: int) -> None:
        self.decoder = decoder
        shape = (batch, decoder.kv_heads, size, decoder.head_dim)
        count = len(decoder.layers)
        device, dtype = decoder.device, decoder.dtype
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(count)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(count)]
        self.mask = torch.zeros((batch, 1, 1, size), device=device, dtype=torch.bool)
        self.tokens = torch.zeros(batch, device=device, dtype=torch.long)
        self.positions = torch.zeros(batch, device=device, dtype=torch.long)
        self.slot = torch.zeros(1, device=device, dtype=torch.long)
        self.graph = None
        self.output = None

    def load(self, cache, attention, length: int) -> None:
        """Copy the prefill's K/V into the static cache; only the prompt's real tokens are visible."""
        for index, layer in enumerate(cache.layers):
            self.keys[index][:, :, :length].copy_(layer.keys)
            self.values[index][:, :, :length].copy_(layer.values)
        self.mask.zero_()
        self.mask[:, 0, 0, :length] = attention.bool()

    def run(self, tokens, positions, slot: int):
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.slot.fill_(slot)
        decoder = self.decoder
        if not decoder.use_graphs:
            return decoder._step(self.tokens, self.positions, self.slot, self.keys, self.values, self.mask)
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.output.clone()

    def _capture(self) -> None:
        """Warm up on a side stream (as CUDA graphs require), then record one step; `run` replays it."""
        decoder = self.decoder
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # computes exactly the step about to be replayed: harmless
            decoder._step(self.tokens, self.positions, self.slot, self.keys, self.values, self.mask)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = decoder._step(self.tokens, self.positions, self.slot, self.keys, self.values, self.mask)
