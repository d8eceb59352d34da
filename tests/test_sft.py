"""SFT examples: the accepted jsonl formats, the loss mask, and one EOS per turn whatever the template."""

import json
import shutil

import pytest

from falcon_mamba import default_model
from falcon_mamba.errors import UserError
from falcon_mamba.sft import encode_example, parse_example
from falcon_mamba.tokenizer import load_tokenizer

# A ChatML-like template that closes every turn with EOS + "\n" (as many instruct models do).
EOS_NL = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}{{ eos_token }}\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture
def tok(tmp_path):
    shutil.copy(default_model.path() / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>",
                                                                "chat_template": EOS_NL}))
    return load_tokenizer(tmp_path)


def trained_text(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_template_eos_is_the_one_trained_no_second_eos(tok):
    ex = parse_example({"messages": [{"role": "user", "content": "Hi"},
                                     {"role": "assistant", "content": "Hello"},
                                     {"role": "user", "content": "Bye"},
                                     {"role": "assistant", "content": "Farewell"}]})
    ids, mask = encode_example(tok, ex)
    eos = tok.eos_token_id
    assert len(ids) == len(mask)
    assert ids.count(eos) == 4  # one per turn, as the template writes them: none added
    assert trained_text(tok, ids, mask) == "Hello<|endoftext|>Farewell<|endoftext|>"
    # the "\n" after each trained EOS is context, and the whole sequence is the template's text
    full = tok.apply_chat_template(ex.messages, add_generation_prompt=False)
    assert tok.decode(ids) == full


def test_sharegpt_and_prompt_completion_formats(tok):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "A"}]
    share = parse_example({"conversations": [{"from": "system", "value": "S"},
                                             {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]})
    assert share.messages == msgs
    conv = parse_example({"prompt": msgs[:2], "completion": msgs[2:]})
    assert encode_example(tok, conv) == encode_example(tok, parse_example({"messages": msgs}))
    # conversational prompt/completion trains the completion only, not the prompt's assistant turns
    two = parse_example({"prompt": [msgs[1], {"role": "assistant", "content": "early"}, msgs[1]],
                         "completion": [{"role": "assistant", "content": "late"}]})
    assert trained_text(tok, *encode_example(tok, two)) == "late<|endoftext|>"
    # plain text pair: no template, the completion and an EOS are trained
    ids, mask = encode_example(tok, parse_example({"prompt": "The sky is", "completion": " blue."}))
    assert tok.decode(ids) == "The sky is blue.<|endoftext|>"
    assert trained_text(tok, ids, mask) == " blue.<|endoftext|>"


@pytest.mark.parametrize("obj,words", [
    ([1, 2], "JSON object"),
    ({"text": "x"}, "found 'text'"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "ShareGPT turn"),
    ({"prompt": "x", "completion": ["y"]}, "must both be strings or both lists"),
    ({"prompt": "x", "completion": ""}, "empty"),
    ({"messages": [{"role": "user"}]}, "string 'content'"),
])
def test_bad_examples(obj, words):
    with pytest.raises(UserError, match=words):
        parse_example(obj)
