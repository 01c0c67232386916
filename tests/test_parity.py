"""The prompts and answers are the seed recipe's: transformers' Qwen2-VL page and the model card."""

from __future__ import annotations

import json

import pytest

from .conftest import noise_image

# The expected strings of ../shared/seeds/000_7d7391b7902ec3c4.txt ("Excepted output: ...").
SEED_SINGLE_IMAGE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n<|im_start|>assistant\n"
)
SEED_VIDEO = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|video_pad|><|vision_end|>What happened in the video?<|im_end|>\n<|im_start|>assistant\n"
)
SEED_CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hello, how are you?"}]},
    {"role": "assistant", "content": "I'm doing well, thank you for asking. How can I assist you today?"},
    {"role": "user", "content": [
        {"type": "text", "text": "Can you describe these images and video?"},
        {"type": "image"}, {"type": "image"}, {"type": "video"},
        {"type": "text", "text": "These are from my vacation."}]},
    {"role": "assistant", "content": "I'd be happy to describe the images and video for you. "
                                     "Could you please provide more context about your vacation?"},
    {"role": "user", "content": "It was a trip to the mountains. Can you see the details in the images and video?"},
]
SEED_WITHOUT_ID = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|>"
    "<|vision_end|>Hello, how are you?<|im_end|>\n<|im_start|>assistant\nI'm doing well, thank you for asking. "
    "How can I assist you today?<|im_end|>\n<|im_start|>user\nCan you describe these images and video?"
    "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|><|vision_start|>"
    "<|video_pad|><|vision_end|>These are from my vacation.<|im_end|>\n<|im_start|>assistant\nI'd be happy to "
    "describe the images and video for you. Could you please provide more context about your vacation?<|im_end|>\n"
    "<|im_start|>user\nIt was a trip to the mountains. Can you see the details in the images and video?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
SEED_WITH_ID = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nPicture 1: <|vision_start|>"
    "<|image_pad|><|vision_end|>Hello, how are you?<|im_end|>\n<|im_start|>assistant\nI'm doing well, thank you "
    "for asking. How can I assist you today?<|im_end|>\n<|im_start|>user\nCan you describe these images and video?"
    "Picture 2: <|vision_start|><|image_pad|><|vision_end|>Picture 3: <|vision_start|><|image_pad|><|vision_end|>"
    "Video 1: <|vision_start|><|video_pad|><|vision_end|>These are from my vacation.<|im_end|>\n<|im_start|>"
    "assistant\nI'd be happy to describe the images and video for you. Could you please provide more context "
    "about your vacation?<|im_end|>\n<|im_start|>user\nIt was a trip to the mountains. Can you see the details "
    "in the images and video?<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def processor(tiny_model):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def seed_recipe(tiny_model, processor):
    """The model card's recipe: apply_chat_template + process_vision_info + processor + greedy generate."""
    from qwen_vl_utils import process_vision_info
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model)

    def answer(paths, question: str, max_new_tokens: int = 16) -> str:
        messages = [{"role": "user", "content": [
            *({"type": "image", "image": f"file://{p}"} for p in paths), {"type": "text", "text": question}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        image_inputs, video_inputs = process_vision_info(messages)
        inputs = processor(text=[text], images=image_inputs, videos=video_inputs, padding=True, return_tensors="pt")
        generated_ids = model.generate(**inputs, max_new_tokens=max_new_tokens)
        trimmed = [out[len(inp):] for inp, out in zip(inputs.input_ids, generated_ids)]
        return processor.batch_decode(trimmed, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]

    return answer


def test_chat_template_renders_the_seed_prompts(processor):
    single = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    video = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happened in the video?"}]}]
    assert processor.apply_chat_template(single, add_generation_prompt=True) == SEED_SINGLE_IMAGE
    assert processor.apply_chat_template(video, add_generation_prompt=True) == SEED_VIDEO
    assert processor.apply_chat_template(SEED_CONVERSATION, add_generation_prompt=True) == SEED_WITHOUT_ID
    assert processor.apply_chat_template(SEED_CONVERSATION, add_generation_prompt=True,
                                         add_vision_id=True) == SEED_WITH_ID


def test_tokenizer_has_qwen2_ids(processor):
    tok = processor.tokenizer
    assert tok("Describe this image.").input_ids == [74785, 419, 2168, 13]
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>")}
    assert ids == {"<|endoftext|>": 151643, "<|im_end|>": 151645, "<|image_pad|>": 151655, "<|video_pad|>": 151656}


def test_session_prompt_is_the_seed_prompt(tiny_model, images):
    from qwen2vl_cli.types import ChatRequest, Media, ModelSpec
    from qwen2vl_cli.engine.session import get_session
    from qwen2vl_cli.sources import resolve_image

    session = get_session(ModelSpec(model=str(tiny_model))).load()
    request = ChatRequest("Describe this image.", [Media("image", "a", resolve_image(str(images["a"])))])
    assert session.prompt_text(request) == SEED_SINGLE_IMAGE
    request.vision_ids = True
    assert session.prompt_text(request) == SEED_SINGLE_IMAGE.replace("user\n<|vision", "user\nPicture 1: <|vision")


def test_describe_equals_seed_recipe(cli, images, seed_recipe):
    expected = seed_recipe([images["a"]], "Describe this image.")
    assert len(set(expected)) > 3, "the tiny model should say something that depends on its input"
    result = cli("describe", images["a"], "-n", "16")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == expected + "\n"
    no_stream = cli("describe", images["a"], "-n", "16", "--no-stream")
    assert no_stream.stdout == expected + "\n"


def test_two_images_with_question_equal_seed_recipe(cli, images, seed_recipe):
    question = "What differs between these pictures?"
    expected = seed_recipe([images["a"], images["b"]], question)
    result = cli("ask", images["a"], images["b"], "-q", question, "-n", "16", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["text"] == expected
    # a different image gives a different answer: the test can fail
    assert seed_recipe([images["c"], images["b"]], question) != expected


def test_vision_ids_change_the_prompt_and_answer(cli, images):
    plain = cli("ask", images["a"], images["b"], "-q", "Compare.", "-n", "12", "--json")
    labelled = cli("ask", images["a"], images["b"], "-q", "Compare.", "-n", "12", "--json", "--vision-ids")
    assert json.loads(plain.stdout)["usage"]["prompt_tokens"] < json.loads(labelled.stdout)["usage"]["prompt_tokens"]


def test_fast_path_answers_equal_generate(cli, images, monkeypatch, tmp_path):
    """The static-cache decoder (on by default on CUDA) gives generate's greedy answers, float32 here."""
    from qwen2vl_cli.engine import session as session_module

    twin = tmp_path / "a-twin.png"  # the size of a: the vision tower takes the two in one attention call
    noise_image(84, 56, 77).save(twin)
    sources = [images["a"], twin, images["b"], images["c"]]
    plain_single = cli("describe", images["a"], "-n", "24").stdout
    plain_batch = cli("batch", *sources, "-n", "24", "-b", "4").stdout
    monkeypatch.setattr(session_module, "_SESSIONS", {})  # a fresh session builds its fast decoder
    monkeypatch.setenv("QWEN2VL_FASTPATH", "on")
    fast_single = cli("describe", images["a"], "-n", "24")
    fast_batch = cli("batch", *sources, "-n", "24", "-b", "4")
    session = next(iter(session_module._SESSIONS.values()))
    assert session.fast, "the fast path was not used"
    assert fast_single.stdout == plain_single
    by_source = lambda text: sorted(map(json.loads, text.splitlines()), key=lambda r: r["source"])  # noqa: E731
    assert by_source(fast_batch.stdout) == by_source(plain_batch)
    sampled = cli("describe", images["a"], "-n", "8", "-t", "0.7", "--seed", "3")  # sampling stays on generate
    assert sampled.exit_code == 0
