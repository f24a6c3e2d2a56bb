"""The RM input: real Qwen3 tokenizer files, its own chat template, right truncation, padding."""

import numpy as np
import pytest

from codescaler_jax.data.tokenizer import (
    bucket_length,
    encode_rm_inputs,
    load_tokenizer,
    pad_right,
    render_rm_text,
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("qwen3")


def test_real_qwen3_tokenizer_ids(tok):
    # Known ids of the Qwen3 BPE (also produced by the independent tiktoken Qwen vocab).
    ids = tok("def add(a, b):\n    return a + b\n", add_special_tokens=False)["input_ids"]
    assert ids == [750, 912, 2877, 11, 293, 982, 262, 470, 264, 488, 293, 198]
    assert tok.convert_tokens_to_ids("<|im_start|>") == 151644
    assert tok.eos_token_id == 151645
    assert tok.pad_token_id == 151643


def test_render_uses_the_tokenizers_own_template(tok):
    text = render_rm_text(tok, "Add two numbers.", "def add(a, b):\n    return a + b")
    # user turn, then the assistant turn with the code; Qwen3's template inserts an empty think
    # block in the last assistant turn, and there is no generation prompt after it.
    assert text.startswith("<|im_start|>user\nAdd two numbers.<|im_end|>\n<|im_start|>assistant\n")
    assert text.endswith("def add(a, b):\n    return a + b<|im_end|>\n")
    assert text.count("<|im_start|>") == 2
    assert "system" not in text
    assert text == tok.apply_chat_template(
        [
            {"role": "user", "content": "Add two numbers."},
            {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
        ],
        tokenize=False,
        add_generation_prompt=False,
    )


def test_encode_right_truncates_and_adds_no_special_tokens(tok):
    full = encode_rm_inputs(tok, ["p " * 50], ["x = 1"], max_length=10_000)[0]
    text = render_rm_text(tok, "p " * 50, "x = 1")
    assert full == tok(text, add_special_tokens=False)["input_ids"]
    short = encode_rm_inputs(tok, ["p " * 50], ["x = 1"], max_length=16)[0]
    assert short == full[:16]  # right truncation keeps the start (the problem)
    assert short[0] == 151644


def test_pad_right_and_buckets():
    ids, mask = pad_right([[1, 2, 3], [4], []], 4, pad_id=0)
    np.testing.assert_array_equal(ids, [[1, 2, 3, 0], [4, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert ids.dtype == np.int32
    assert bucket_length(5, [8, 16]) == 8
    assert bucket_length(9, [8, 16]) == 16
    assert bucket_length(99, [8, 16]) == 16


def test_unknown_tokenizer_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(str(tmp_path / "nope"))
