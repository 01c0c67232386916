"""The other libraries' internals qwen2vl leans on (qwen2vl_cli/compat.py) are there in the installed versions and do
what compat.py says: an upgrade that drops one fails here, not as a quietly slower engine or an unguarded fetch."""

from __future__ import annotations

import pytest

from qwen2vl_cli import compat

from .conftest import noise_image


def test_a_processors_images_are_seen_before_its_text_is_tokenized(tiny_model):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                        "text": "Hi"}]}],
                                         tokenize=False, add_generation_prompt=True)
    image = noise_image(56, 84, seed=3)
    plain = processor(text=[text], images=[image], return_tensors="pt")
    seen, order = [], []
    tokenizer_type = type(processor.tokenizer)
    tokenize = tokenizer_type.__call__

    def watched(self, *args, **kwargs):
        order.append("tokenized")
        return tokenize(self, *args, **kwargs)

    assert compat.after_image_processing(processor, lambda inputs: (seen.append(inputs), order.append("images")))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tokenizer_type, "__call__", watched)
        hooked = processor(text=[text], images=[image], return_tensors="pt")
    assert order[:2] == ["images", "tokenized"]
    assert len(seen) == 1 and (seen[0]["pixel_values"] == plain["pixel_values"]).all()
    assert all((hooked[key] == plain[key]).all() for key in plain)


def test_a_transport_connects_only_through_the_backend_it_is_given():
    import httpcore
    import httpx

    asked = []

    class Refusing(httpcore.SyncBackend):
        def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
            asked.append((host, port))
            raise httpcore.ConnectError("refused by the test")

    with httpx.Client(transport=compat.transport_through(Refusing())) as client, pytest.raises(httpx.ConnectError):
        client.get("https://example.invalid:8443/x")
    assert asked == [("example.invalid", 8443)]


def test_qwen_vl_utils_video_readers_are_there():
    readers = compat.video_readers()
    assert set(readers) == {"decord", "torchcodec"} and all(map(callable, readers.values()))


def test_the_attention_kernel_of_a_loaded_model_is_read(tiny_model):
    from transformers import Qwen2VLForConditionalGeneration

    for kernel in ("eager", "sdpa"):
        model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model, attn_implementation=kernel)
        assert compat.attn_implementation(model.config) == kernel
