import json
import shutil

import pytest

import falcon_mamba as fm
from falcon_mamba.tokenizer import FALLBACK_CHAT_TEMPLATE
from tests.conftest import FALCON_TOKENIZER


@pytest.fixture(scope="module")
def tok():
    return fm.load_tokenizer(FALCON_TOKENIZER)


def test_roundtrip_and_specials(tok):
    text = "Hello, world! 12345 ünïcode — 日本語 🙂\n\tcode()"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.vocab_size == 65024 and tok.eos_token_id == 11
    assert tok.encode("<|endoftext|>") == [11]
    # Falcon's pre-tokenizer splits digit runs into threes.
    assert [tok.decode([i]) for i in tok.encode("1234567")] == ["123", "456", "7"]


def test_fallback_chat_template(tok):
    assert not tok.has_chat_template and tok.chat_template == FALLBACK_CHAT_TEMPLATE
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "Hello."},
                                    {"role": "user", "content": "Bye"}])
    assert text == "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello.\n\nUser: Bye\n\nAssistant:"


def test_folder_chat_template(tmp_path):
    shutil.copy(FALCON_TOKENIZER, tmp_path / "tokenizer.json")
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "eos_token": "<|endoftext|>"}))
    t = fm.load_tokenizer(tmp_path)
    assert t.has_chat_template
    assert t.apply_chat_template([{"role": "user", "content": "x"}]) == (
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n")


def test_bad_messages(tok):
    with pytest.raises(fm.UserError, match="role"):
        tok.apply_chat_template([{"content": "no role"}])


def test_missing_and_broken_tokenizer(tmp_path):
    with pytest.raises(fm.UserError, match="tokenizer.json"):
        fm.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(fm.UserError, match="not a valid tokenizer.json"):
        fm.load_tokenizer(tmp_path)
