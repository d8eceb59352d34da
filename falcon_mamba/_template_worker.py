"""The chat-template worker: a separate process that renders untrusted Jinja chat templates.

Started by falcon_mamba.chat_template as ``python <this file> MEMORY_BYTES``; it imports only the
standard library and jinja2 (no torch: it starts in ~50 ms). A template from a model folder is
code written by someone else: here it runs in jinja2's immutable sandbox, in a process whose
address space is capped (RLIMIT_AS), and the parent kills the process when a render takes too
long, so a template can neither escape, nor exhaust the server's memory, nor hang it.

Protocol on stdin/stdout, one message per exchange: an 8-byte big-endian length, then that many
bytes of ASCII JSON. Request {"template", "vars", "max_chars"} -> reply {"text"} or
{"error": kind, "message"}; kind is one of syntax, security, undefined, raised, memory, recursion,
size, other.
"""

import sys

sys.path.pop(0)  # this file's folder holds modules named like others'; import only installed ones

import json  # noqa: E402
import struct  # noqa: E402
from datetime import datetime  # noqa: E402


class _TooLong(Exception):
    pass


class _Raised(Exception):
    pass


def _environment(max_chars: list):
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """transformers' {% generation %} ... {% endgeneration %}: here the body is just rendered."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    class Env(ImmutableSandboxedEnvironment):
        # '*' and '+' build strings and lists in one step ('a' * 4000000000): refuse results over
        # the output limit before they are allocated.
        intercepted_binops = frozenset(["*", "+"])

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for a, b in ((left, right), (right, left)):
                    if isinstance(a, (str, list, tuple)) and isinstance(b, int) and len(a) * b > max_chars[0]:
                        raise _TooLong()
            elif isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                if len(left) + len(right) > max_chars[0]:
                    raise _TooLong()
            return super().call_binop(context, operator, left, right)

    env = Env(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, "jinja2.ext.loopcontrols"])

    def raise_exception(message):
        raise _Raised(str(message))

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # As transformers: no HTML escaping, and the usual json.dumps options.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env, jinja2


def _render(env, jinja2, cache: dict, req: dict, max_chars: list) -> dict:
    max_chars[0] = int(req["max_chars"])
    source = req["template"]
    try:
        tmpl = cache.get(source)
        if tmpl is None:
            tmpl = cache[source] = env.from_string(source)
            if len(cache) > 16:
                cache.pop(next(iter(cache)))
        parts, n = [], 0
        for piece in tmpl.generate(**req["vars"]):
            n += len(piece)
            if n > max_chars[0]:
                raise _TooLong()
            parts.append(piece)
        return {"text": "".join(parts)}
    except _TooLong:
        return {"error": "size", "message": f"its output is over {max_chars[0]:,} characters"}
    except _Raised as e:
        return {"error": "raised", "message": str(e)}
    except jinja2.TemplateSyntaxError as e:
        return {"error": "syntax", "message": f"line {e.lineno}: {e.message}"}
    except jinja2.exceptions.SecurityError as e:
        return {"error": "security", "message": str(e)}
    except jinja2.UndefinedError as e:
        return {"error": "undefined", "message": str(e)}
    except MemoryError:
        return {"error": "memory", "message": "it needs more memory than a template may use"}
    except RecursionError:
        return {"error": "recursion", "message": "it recurses too deeply"}
    except Exception as e:  # a template bug of any other kind (TypeError, ZeroDivisionError...)
        return {"error": "other", "message": f"{type(e).__name__}: {e}"}


def _read(stream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = stream.read(n - len(data))
        if not more:
            raise EOFError
        data += more
    return data


def main() -> None:
    try:
        import resource

        limit = int(sys.argv[1])
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, IndexError, OSError):
        pass  # no RLIMIT_AS on this platform: the time and size limits still hold
    max_chars = [0]
    env, jinja2 = _environment(max_chars)
    cache: dict = {}
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            (size,) = struct.unpack(">Q", _read(inp, 8))
            req = json.loads(_read(inp, size))
        except EOFError:
            return
        try:
            reply = _render(env, jinja2, cache, req, max_chars)
            data = json.dumps(reply).encode("ascii")
        except MemoryError:
            data = json.dumps({"error": "memory", "message": "it needs more memory than a template "
                                                              "may use"}).encode("ascii")
        out.write(struct.pack(">Q", len(data)) + data)
        out.flush()


if __name__ == "__main__":
    main()
