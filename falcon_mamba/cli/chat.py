"""`falcon-mamba chat`: an interactive session whose whole memory is one recurrent state.

Each turn reads only the new text (the user's message in the chat template), never the history
again, so a turn costs the same whatever the length of the conversation. Commands:
/reset (forget everything), /save FILE and /load FILE (the session state), /help, /quit.
Ctrl-C stops the current answer and keeps the session; Ctrl-D or /quit ends it.
"""

from __future__ import annotations

import dataclasses
import sys

NAME = "chat"
HELP = "interactive chat with the chat template; /reset, /save FILE, /load FILE; Ctrl-C stops an answer"

COMMANDS = "/reset  /save FILE  /load FILE  /help  /quit   (Ctrl-C stops an answer, Ctrl-D quits)"


def add_arguments(p) -> None:
    from falcon_mamba.cli.generate import add_model_arguments, add_sampling_arguments

    add_model_arguments(p)
    p.add_argument("--system", default=None, help="a system message read at the start of the session")
    add_sampling_arguments(p, max_new_tokens=512)
    p.add_argument("--chunk-size", type=int, default=None, help="tokens per prefill chunk (default 2048)")
    from falcon_mamba.decode.modes import add_decode_arguments

    add_decode_arguments(p)


class ChatSession:
    """The conversation as a State plus the template text it has read since its origin (the start,
    /reset or /load). A turn prefills only the new part of the rendered conversation; after the
    answer the state re-reads the answer text with the template's closing, from a copy taken
    after the prompt, so the state always equals "the rendered conversation, read" whether the
    answer ended with EOS, a stop string or Ctrl-C."""

    def __init__(self, model, tokenizer, params, system: str | None = None, chunk_size: int | None = None,
                 decode=None):
        self.model = model
        self.decode = decode  # DecodeOptions (None: the defaults)
        self.tok = tokenizer
        self.system = system
        self.chunk_size = chunk_size
        # Where the template closes an assistant turn: a stop string, so the model does not go on
        # to write the user's next turn itself.
        self.params = dataclasses.replace(params, stop=tuple(params.stop) + tokenizer.end_of_turn_stops())
        self.reset()

    def reset(self) -> None:
        self.state = None
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.read_text = ""  # the rendering of self.messages the state has read

    def save(self, path: str) -> None:
        from falcon_mamba.state import check_state_path

        check_state_path(path, "/save")
        (self.state or self.model.new_state(1)).save(path)

    def load(self, path: str) -> None:
        """Replace the session by a saved state; on any error the session is unchanged."""
        import falcon_mamba as fm

        state = fm.load_state(path, self.model)
        if state.batch_size != 1:
            raise fm.UserError(f"{path}: holds {state.batch_size} rows; a chat needs one")
        self.state = state
        self.messages, self.read_text = [], ""

    def _read(self, ids: list[int], state):
        from falcon_mamba.generate import prefill

        if not ids:
            return None, state
        return prefill(self.model, ids, state, chunk_size=self.chunk_size)

    def ask(self, user_text: str, on_piece) -> tuple[str, bool]:
        """One turn: on_piece(text) for each piece of the answer. Returns (answer, interrupted).
        Ctrl-C while the prompt is read drops the turn (KeyboardInterrupt propagates, session
        unchanged); Ctrl-C during the answer keeps the partial answer."""
        from falcon_mamba.generate import generate

        msgs = self.messages + [{"role": "user", "content": user_text}]
        prompt = self.tok.apply_chat_template(msgs, add_generation_prompt=True)
        state = self.state
        if not prompt.startswith(self.read_text):
            state, self.read_text = None, ""  # the template rewrote the past: read it all again
        new_ids = self.tok.encode(prompt[len(self.read_text):])
        answer, interrupted, after_prompt = "", False, state
        if new_ids:
            stream = generate(self.model, self.tok, new_ids, params=self.params, state=state, stream=True,
                              chunk_size=self.chunk_size, decode=self.decode)
            try:
                for piece in stream:
                    answer += piece
                    on_piece(piece)
            except KeyboardInterrupt:
                interrupted = True
            after_prompt = stream.result.prompt_state
            if after_prompt is None:  # stopped before the message was read: drop the turn
                raise KeyboardInterrupt
        msgs = msgs + [{"role": "assistant", "content": answer}]
        closed = self.tok.apply_chat_template(msgs, add_generation_prompt=False)
        rest = closed[len(prompt):] if closed.startswith(prompt) else answer
        _, self.state = self._read(self.tok.encode(rest), after_prompt)
        self.messages, self.read_text = msgs, (closed if closed.startswith(prompt) else prompt + rest)
        return answer, interrupted


def run(args) -> int:
    from falcon_mamba.cli.generate import load_model_and_tokenizer, sampling_params
    from falcon_mamba.errors import UserError

    params = sampling_params(args)
    if args.chunk_size is not None and args.chunk_size < 1:
        raise UserError(f"--chunk-size must be a positive integer, got {args.chunk_size}")
    model, tok = load_model_and_tokenizer(args)
    from falcon_mamba.decode.modes import options_from_args

    session = ChatSession(model, tok, params, args.system, args.chunk_size, options_from_args(args))
    tty = sys.stdin is not None and sys.stdin.isatty()
    print(f"chat with {args.model}, using {tok.describe_chat_template()}. {COMMANDS}", file=sys.stderr)
    out = sys.stdout

    def show(piece: str) -> None:
        out.write(piece)
        out.flush()

    while True:
        try:
            line = input("> " if tty else "")
        except (EOFError, RuntimeError):  # RuntimeError: stdin is closed
            break
        except UnicodeDecodeError:
            print("error: that line is not UTF-8 text; it was dropped", file=sys.stderr)
            continue
        except KeyboardInterrupt:
            print(file=sys.stderr)
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            arg = arg.strip()
            try:
                if cmd in ("/quit", "/exit"):
                    break
                elif cmd == "/help":
                    print(COMMANDS, file=sys.stderr)
                elif cmd == "/reset":
                    session.reset()
                    print("(session reset)", file=sys.stderr)
                elif cmd in ("/save", "/load"):
                    if not arg:
                        raise UserError(f"{cmd} needs a file name: {cmd} FILE")
                    if cmd == "/save":
                        session.save(arg)
                        print(f"(state saved to {arg})", file=sys.stderr)
                    else:
                        session.load(arg)
                        print(f"(state loaded from {arg})", file=sys.stderr)
                else:
                    raise UserError(f"unknown command {cmd}; {COMMANDS}")
            except UserError as e:  # a bad command must not end the session
                print(f"error: {e}", file=sys.stderr)
            continue
        try:
            _, interrupted = session.ask(line, show)
        except KeyboardInterrupt:
            print("\n(interrupted while reading the message; it was dropped)", file=sys.stderr)
            continue
        except UserError as e:  # e.g. the template refuses this message: the session goes on
            print(f"error: {e}", file=sys.stderr)
            continue
        out.write("\n")
        out.flush()
        if interrupted:
            print("(answer stopped)", file=sys.stderr)
    return 0
