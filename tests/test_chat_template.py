"""Chat templates: where they come from (chat_template.jinja, string or list form), and rendering
an untrusted template within limits (sandbox errors, loops, huge outputs: one UserError each, fast).
"""

import json
import shutil
import time

import pytest

import falcon_mamba.chat_template as CT
from falcon_mamba import default_model
from falcon_mamba.errors import UserError
from falcon_mamba.tokenizer import load_tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setattr(CT, "TIME_LIMIT_S", 1.5)
    shutil.copy(default_model.path() / "tokenizer.json", tmp_path)
    return tmp_path


def with_template(folder, template, **extra):
    cfg = {"eos_token": "<|endoftext|>", **extra}
    if template is not None:
        cfg["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return load_tokenizer(folder)


def test_sources_jinja_file_list_form_and_fallback(folder):
    tok = with_template(folder, None)
    assert not tok.has_chat_template and "fallback" in tok.describe_chat_template()
    assert tok.apply_chat_template(MSGS) == "User: hi\n\nAssistant:"
    tok = with_template(folder, [{"name": "tool_use", "template": "TOOLS"},
                                 {"name": "default", "template": "D{{ messages[0].content }}"}])
    assert tok.apply_chat_template(MSGS) == "Dhi" and "'default'" in tok.describe_chat_template()
    tok = with_template(folder, [{"name": "rag", "template": "R"}])
    assert tok.apply_chat_template(MSGS) == "R"
    with pytest.raises(UserError, match="must be a string or a list"):
        with_template(folder, {"oops": 1})
    # transformers 5 writes chat_template.jinja; it wins over tokenizer_config.json
    (folder / "chat_template.jinja").write_text(CHATML, encoding="utf-8")
    tok = with_template(folder, "IGNORED")
    assert tok.apply_chat_template(MSGS) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert "chat_template.jinja" in tok.describe_chat_template()
    assert tok.end_of_turn_stops() == ("<|im_end|>",)


def test_transformers_extensions_work(folder):
    tok = with_template(folder, "{% for m in messages %}{{ m.content|tojson }}{% break %}{% endfor %}"
                                "{% generation %}!{% endgeneration %}{{ strftime_now('%Y')|length }}")
    assert tok.apply_chat_template(MSGS + MSGS) == '"hi"!4'


BAD = [
    ("{{ messages.__class__.__mro__ }}", "sandbox forbids"),
    ("{{ foo.bar }}", "undefined"),
    ("{{ raise_exception('roles must alternate') }}", "chat template: roles must alternate"),
    ("{% for %}", "does not parse"),
    ("{{ 'a' * 4000000000 }}", "too large"),
    ("{{ [1] * 4000000000 }}", "too large"),
    ("{{ 'a'|center(4000000000) }}", "memory"),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recurses"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "took over"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
]


@pytest.mark.parametrize("template,words", BAD)
def test_bad_templates_are_one_clear_error_within_the_limit(folder, template, words):
    tok = with_template(folder, template)
    t0 = time.monotonic()
    with pytest.raises(UserError, match=words):
        tok.apply_chat_template(MSGS)
    assert time.monotonic() - t0 < CT.TIME_LIMIT_S + 3
    assert tok.end_of_turn_stops() == () or "took over" not in words
    # the worker survives (or is restarted): a good template renders right after
    assert with_template(folder, CHATML).apply_chat_template(MSGS).startswith("<|im_start|>user")


def test_output_limit_counts_what_is_written(folder):
    tok = with_template(folder, "{% for i in range(1000) %}{{ messages[0].content }}{% endfor %}")
    assert len(CT.render(tok.template, {"messages": [{"role": "user", "content": "x" * 100}]},
                         max_chars=100_000)) == 100_000
    with pytest.raises(UserError, match="over 99,999 characters"):
        CT.render(tok.template, {"messages": [{"role": "user", "content": "x" * 100}]}, max_chars=99_999)


def test_lone_surrogates_travel_to_the_worker_and_back(folder):
    tok = with_template(folder, "{{ messages[0].content }}")
    assert tok.apply_chat_template([{"role": "user", "content": "a\ud800b"}]) == "a\ud800b"
    with pytest.raises(UserError, match="lone surrogate"):
        tok.encode("a\ud800b")
