"""Build random-weight Qwen2-VL checkpoints in Hugging Face layout, for tests and benchmarks.

No weights can be downloaded on the machines this project is built on, so tests and the GPU
benchmark make their own checkpoint: Qwen2-VL's real configuration (or a tiny one), random
weights, Qwen2's real tokenizer (the vocabulary ships with the `dashscope` package) and the
Qwen2-VL chat template. Everything is then loaded through the same `from_pretrained` path users hit.
"""

from __future__ import annotations

import json
from pathlib import Path

# Qwen2's special tokens, in the order that gives them Qwen2's ids (151643 onwards).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
BOS_ID, EOS_ID = 151643, 151645
MIN_PIXELS, MAX_PIXELS = 4 * 28 * 28, 16384 * 28 * 28  # the released preprocessor_config.json

# Qwen2-VL-Instruct's chat template (tokenizer_config.json / chat_template.json of the released models).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Shapes from the released configs (../shared/FACTS.md); "tiny" keeps the real vocabulary and ids.
SIZES = {
    "tiny": dict(
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                  mrope_section=[1, 1, 2]),
        vision=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2),
    ),
    # "small": the smallest shapes that real kernels take: vLLM's CPU attention needs a head size of at least
    # 32, GPTQ's CPU kernel output widths in multiples of 32 and input widths in multiples of its group (128)
    "small": dict(
        text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                  mrope_section=[4, 6, 6]),
        vision=dict(depth=2, embed_dim=64, num_heads=2, mlp_ratio=2),
    ),
    "2b": dict(
        text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                  mrope_section=[16, 24, 24]),
        vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4),
    ),
    "7b": dict(
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
                  mrope_section=[16, 24, 24]),
        vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4),
    ),
}


def build_tokenizer():
    """Qwen2's byte-level BPE tokenizer from the vocabulary file shipped in `dashscope`."""
    import importlib.util

    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    spec = importlib.util.find_spec("dashscope")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("building a checkpoint needs the 'dashscope' package (pip install -e '.[test]')")
    vocab = Path(list(spec.submodule_search_locations)[0]) / "resources" / "qwen.tiktoken"
    pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    backend = TikTokenConverter(vocab_file=str(vocab), pattern=pattern,
                                extra_special_tokens=SPECIAL_TOKENS).converted()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        extra_special_tokens=SPECIAL_TOKENS[1:],
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )


def build_config(size: str = "tiny"):
    """A Qwen2VLConfig with the shapes of `size` ("tiny", "small", "2b" or "7b")."""
    from transformers import Qwen2VLConfig

    shape = SIZES[size]
    text = dict(shape["text"])
    mrope = text.pop("mrope_section")
    tie = text.pop("tie_word_embeddings")
    text.update(
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope},
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, max_position_embeddings=32768, rms_norm_eps=1e-6,
    )
    vision = dict(shape["vision"], hidden_size=text["hidden_size"], patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    return Qwen2VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=tie,
        image_token_id=151655, video_token_id=151656,
        vision_start_token_id=151652, vision_end_token_id=151653,
    )


def build_checkpoint(path: str | Path, size: str = "tiny", *, std: float = 0.5, seed: int = 0,
                     dtype: str = "float32", device: str = "cpu") -> Path:
    """Write a random-weight Qwen2-VL checkpoint (config, safetensors, tokenizer, processor) to `path`.

    `std` scales the random weights: the default 0.02 initialisation makes a tiny model answer with
    one repeated token, while wider weights give greedy answers that differ per image and prompt.
    """
    import torch
    from transformers import (GenerationConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = build_config(size)
    config.text_config.initializer_range = std
    config.vision_config.initializer_range = std
    with torch.device(device):  # a full-size model initialises in seconds on a GPU, minutes on a CPU
        model = Qwen2VLForConditionalGeneration(config).to(getattr(torch, dtype))
    if size in ("tiny", "small"):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.dim() > 1:
                    param.normal_(0.0, std)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=[EOS_ID, BOS_ID], pad_token_id=BOS_ID, do_sample=False,
    )
    import transformers

    transformers.utils.logging.disable_progress_bar()
    model.save_pretrained(path)

    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
        video_processor=Qwen2VLVideoProcessor(),
        tokenizer=build_tokenizer(),
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(path)
    _list_added_tokens(path)
    (path / "qwen2vl_random_checkpoint.json").write_text(
        json.dumps({"size": size, "std": std, "seed": seed}) + "\n")
    return path


def _list_added_tokens(path: Path) -> None:
    """tokenizer_config.json lists the added tokens as the released checkpoints' does ("added_tokens_decoder"):
    without it transformers reads the whole tokenizer.json in Python at every load (~1 s on the test machine)."""
    tokenizer = json.loads((path / "tokenizer.json").read_text())
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["added_tokens_decoder"] = {str(token["id"]): {k: v for k, v in token.items() if k != "id"}
                                      for token in tokenizer["added_tokens"]}
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


QUANTIZED_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the order AWQ's GEMM layout packs 8 four-bit values into an int32


def quantize_checkpoint(source: str | Path, target: str | Path, twin: str | Path, method: str = "gptq",
                        bits: int = 4, group_size: int = 128) -> Path:
    """Quantize a float checkpoint's text projections the way the released checkpoints are laid out, and
    write its dequantized twin: a float checkpoint of exactly the weights the quantized one holds.

    `method` "gptq": the auto-gptq ("v1") layout, symmetric (every packed zero is 2**(bits-1) - 1, e.g.
    0x77777777), qweight [in/(32/bits), out], qzeros [in/g, out/(32/bits)], fp16 scales [in/g, out],
    g_idx = i // g. "awq": 4-bit GEMM layout with zero points, qweight and qzeros [.., out/8] interleaved
    in AWQ_ORDER, modules_to_not_convert ["visual"] as the real releases say. The vision tower, embeddings
    and lm_head stay as they are. Widths must be multiples of 32 and inputs of `group_size` ("small")."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    source, target, twin = Path(source), Path(target), Path(twin)
    for folder in (target, twin):
        shutil.copytree(source, folder, dirs_exist_ok=True)
    tensors = load_file(source / "model.safetensors")
    packed, dequantized, top = {}, dict(tensors), 2 ** bits - 1
    for name, weight in tensors.items():
        if not (name.startswith("model.layers.") and name.endswith(".weight")
                and name.split(".")[-2] in QUANTIZED_PROJECTIONS):
            packed[name] = weight.half() if weight.is_floating_point() else weight  # as the releases store them
            dequantized[name] = packed[name].to(weight.dtype)  # the twin holds exactly the same values
            continue
        base, (rows, cols) = name[:-len(".weight")], weight.shape
        groups = weight.float().reshape(rows, cols // group_size, group_size)
        if method == "gptq":
            zero = torch.full((rows, cols // group_size), 2 ** (bits - 1))
            scale = (groups.abs().amax(-1) / (2 ** (bits - 1) - 1)).clamp(min=1e-8).half()
        else:
            low, high = groups.amin(-1), groups.amax(-1)
            scale = ((high - low) / top).clamp(min=1e-8).half()
            zero = torch.clamp(torch.round(-low / scale.float()), 0, top)
        q = torch.clamp(torch.round(groups / scale.float()[..., None]) + zero[..., None], 0, top)
        dequantized[name] = (scale.float()[..., None] * (q - zero[..., None])).half().reshape(rows, cols).to(weight.dtype)
        q = q.reshape(rows, cols).long()
        if method == "gptq":
            packed[base + ".qweight"] = _pack(q.t(), bits, 0)
            packed[base + ".qzeros"] = _pack(zero.t().long() - 1, bits, 1)  # v1 stores zero - 1
            packed[base + ".g_idx"] = (torch.arange(cols) // group_size).int()
        else:
            order = torch.tensor(AWQ_ORDER)
            packed[base + ".qweight"] = _pack(q.t().reshape(cols, -1, 8)[..., order].reshape(cols, rows), bits, 1)
            packed[base + ".qzeros"] = _pack(zero.t().long().reshape(cols // group_size, -1, 8)[..., order]
                                             .reshape(cols // group_size, rows), bits, 1)
        packed[base + ".scales"] = scale.t().contiguous()
    save_file(packed, target / "model.safetensors", metadata={"format": "pt"})
    save_file(dequantized, twin / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    config["dtype"] = "float16"
    config["quantization_config"] = (
        {"bits": bits, "group_size": group_size, "damp_percent": 0.1, "desc_act": False, "sym": True,
         "true_sequential": True, "quant_method": "gptq"} if method == "gptq" else
        {"bits": bits, "group_size": group_size, "quant_method": "awq", "version": "gemm", "zero_point": True,
         "modules_to_not_convert": ["visual"]})
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return target


def _pack(values, bits: int, dim: int):
    """Values under 2**bits packed into int32 words along `dim`, the first in the lowest bits."""
    import torch

    per_word = 32 // bits
    moved = values.long().movedim(dim, 0)
    moved = moved.reshape(moved.shape[0] // per_word, per_word, *moved.shape[1:])
    words = sum(moved[:, k] << (bits * k) for k in range(per_word))
    words = (words + 2 ** 31) % 2 ** 32 - 2 ** 31  # the same 32 bits, as a signed int32
    return words.movedim(0, dim).int().contiguous()


if __name__ == "__main__":  # python -m tests.checkpoint DIR [tiny|small|2b|7b]
    import sys

    print(build_checkpoint(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "tiny"))
