"""Chat templates: finding a model folder's template, and rendering it within limits.

Where a template comes from, first found wins (as transformers reads them):
    chat_template.jinja                 the file transformers 5 saves
    tokenizer_config.json chat_template a string, or a list of {"name", "template"} (the one named
                                        "default", else the first)
    the fallback                        this package's plain role-header template (FALLBACK below)

A model folder's template is code from whoever published the model. It is rendered in jinja2's
immutable sandbox in a worker process (_template_worker.py) with a time limit, an output-size limit
and a memory cap; every failure is one UserError naming the template problem. The fallback is
ours and is rendered in this process.
"""

from __future__ import annotations

import atexit
import json
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from falcon_mamba.errors import UserError

FALLBACK = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}System: {{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n\n"
    "{% else %}Assistant: {{ m['content'] }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
FALLBACK_DESCRIPTION = ("the built-in fallback template ('User: ...' / 'Assistant: ...' paragraphs): "
                        "the model folder has no chat template")

TIME_LIMIT_S = 5.0  # one render; real templates take about a millisecond
MAX_OUTPUT_CHARS = 32 * 1024 * 1024
MEMORY_LIMIT_BYTES = 2 * 1024**3  # the worker's address space


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    origin: str | None  # the file it came from; None for the fallback

    @property
    def is_fallback(self) -> bool:
        return self.origin is None

    def describe(self) -> str:
        return FALLBACK_DESCRIPTION if self.is_fallback else f"the model's chat template ({self.origin})"


def find_template(folder: Path | None, config: dict) -> ChatTemplate:
    """The template a model folder (and its parsed tokenizer_config.json) defines, or the fallback."""
    if folder is not None:
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():
            try:
                return ChatTemplate(jinja.read_text(encoding="utf-8"), str(jinja))
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"{jinja}: cannot read the chat template ({e})") from None
    where = "tokenizer_config.json" if folder is None else str(folder / "tokenizer_config.json")
    value = config.get("chat_template")
    if value is None or value == "":
        return ChatTemplate(FALLBACK, None)
    if isinstance(value, str):
        return ChatTemplate(value, where)
    if isinstance(value, list) and value and all(
            isinstance(t, dict) and isinstance(t.get("template"), str) for t in value):
        named = {t.get("name"): t["template"] for t in value}
        name = "default" if "default" in named else value[0].get("name")
        return ChatTemplate(named.get(name, value[0]["template"]), f"{where}, template {name!r}")
    raise UserError(f"{where}: chat_template must be a string or a list of {{\"name\", \"template\"}} "
                    f"objects, got {type(value).__name__}")


class _Worker:
    """One worker process, restarted after a timeout or a crash. Thread-safe (one render at a time)."""

    def __init__(self):
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        worker = Path(__file__).with_name("_template_worker.py")
        return subprocess.Popen([sys.executable, str(worker), str(MEMORY_LIMIT_BYTES)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
            for f in (proc.stdin, proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass

    def render(self, request: dict, timeout_s: float) -> dict:
        data = json.dumps(request).encode("ascii")  # ascii: lone surrogates travel escaped
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._kill()
                self._proc = self._start()
            proc = self._proc
            reply: list = []

            def exchange():
                try:
                    proc.stdin.write(struct.pack(">Q", len(data)) + data)
                    proc.stdin.flush()
                    head = proc.stdout.read(8)
                    if len(head) == 8:
                        body = proc.stdout.read(struct.unpack(">Q", head)[0])
                        reply.append(json.loads(body))
                except (OSError, ValueError):
                    pass  # the worker died (killed by the timeout, or out of memory)

            t = threading.Thread(target=exchange, name="chat-template-render", daemon=True)
            t.start()
            t.join(timeout_s)
            if t.is_alive() or not reply:
                timed_out = t.is_alive()
                self._kill()
                t.join()
                if timed_out:
                    raise UserError(f"the chat template took over {timeout_s:g} s to render (a "
                                    "template that loops without end?); fix the model folder's template")
                raise UserError("the chat template's renderer stopped (out of memory?); fix the "
                                "model folder's template")
            return reply[0]

    def close(self) -> None:
        with self._lock:
            self._kill()


_WORKER = _Worker()

_KINDS = {
    "syntax": "does not parse",
    "security": "does something the sandbox forbids",
    "undefined": "uses an undefined value",
    "memory": "ran out of memory",
    "recursion": "failed",
    "size": "is too large",
    "other": "failed to render",
}


def render(template: ChatTemplate, variables: dict, *, timeout_s: float | None = None,
           max_chars: int | None = None) -> str:
    """Render a template with variables (messages, add_generation_prompt, bos_token, ...); the
    limits default to TIME_LIMIT_S and MAX_OUTPUT_CHARS."""
    if template.is_fallback:
        return _render_here(template.source, variables)
    max_chars = MAX_OUTPUT_CHARS if max_chars is None else max_chars
    reply = _WORKER.render({"template": template.source, "vars": variables, "max_chars": max_chars},
                           TIME_LIMIT_S if timeout_s is None else timeout_s)
    if "text" in reply:
        return reply["text"]
    kind, message = reply.get("error"), reply.get("message", "")
    if kind == "raised":  # the template's own raise_exception: its message is for the user
        raise UserError(f"chat template: {message}")
    raise UserError(f"the chat template ({template.origin}) {_KINDS.get(kind, 'failed')}: {message}")


def _render_here(source: str, variables: dict) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(source).render(**variables)


def shutdown_worker() -> None:
    """Stop the worker process (it also ends by itself when this process exits)."""
    _WORKER.close()


atexit.register(shutdown_worker)
