"""Interactive chat with a trained student (or D): the user is the seeker, the model the
recommender; item tokens in replies are shown as movie titles.

    python launch/chat.py --model runs/distill/hf [--catalog DIR_OR_items.json]
        [--mode auto|rec|gen] [--decoding greedy|beam|sample]

Commands: ``/mode rec|gen|auto`` (force the mode token, or let the model choose),
``/reset`` (new conversation), ``/help``, ``/quit`` (or end of input).

In a terminal: a ``you> `` prompt and ``bot> `` replies. Through a pipe (stdin not a tty):
each input line is one user turn and stdout gets exactly one line per turn, the rendered
reply; command acknowledgements go to stderr; the program exits at end of input.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TextIO

from conkd_scale.data.schema import RECOMMENDER, SEEKER, ItemCatalog
from conkd_scale.eval.generation import MODES, Generated, LMGenerator, Mode, display_text
from conkd_scale.eval.metrics_lm import normalise_space

PROMPT = "you> "
BOT = "bot> "
HELP = "commands: /mode rec|gen|auto, /reset, /help, /quit"


@dataclass
class ChatSession:
    """A conversation with one model (history of ``(role, text)`` turns, item tokens kept)."""

    generator: LMGenerator
    catalog: ItemCatalog
    mode: Mode = "auto"
    history: list[tuple[str, str]] = field(default_factory=list)

    def respond(self, user_text: str) -> Generated:
        """Add the user's turn, generate the recommender's reply, add it too."""
        self.history.append((SEEKER, normalise_space(user_text)))
        reply = self.generator.generate([self.history], self.mode)[0]
        self.history.append((RECOMMENDER, reply.reply))
        return reply

    def render(self, reply: Generated) -> str:
        return display_text(reply.reply, self.catalog)

    def reset(self) -> None:
        self.history.clear()

    def command(self, line: str) -> tuple[str, bool]:
        """Run a ``/command``: ``(message for the user, quit?)``."""
        name, _, arg = line[1:].strip().partition(" ")
        arg = arg.strip()
        if name in ("quit", "exit"):
            return "bye", True
        if name == "reset":
            self.reset()
            return "(new conversation)", False
        if name == "mode":
            if arg not in MODES:
                return f"usage: /mode {'|'.join(MODES)} (now: {self.mode})", False
            if arg != "auto" and not self.generator.settings.use_mode_tokens:
                return "this model was trained without mode tokens: only /mode auto", False
            self.mode = arg  # type: ignore[assignment]
            return f"mode: {self.mode}", False
        if name == "help":
            return HELP, False
        return f"unknown command /{name} ({HELP})", False


def run_pipe(session: ChatSession, lines: Iterable[str], out: TextIO, err: TextIO) -> int:
    """Non-interactive loop: one reply line per non-empty input line, until EOF or /quit."""
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if line.startswith("/"):
            msg, quit_ = session.command(line)
            print(msg, file=err, flush=True)
            if quit_:
                return 0
            continue
        print(session.render(session.respond(line)), file=out, flush=True)
    return 0


def run_terminal(session: ChatSession, out: TextIO) -> int:
    """Interactive loop with prompts (``input`` uses readline when available)."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    print(f"Chat with the recommender ({HELP}).", file=out, flush=True)
    while True:
        try:
            line = input(PROMPT).strip()
        except EOFError:
            print(file=out, flush=True)
            return 0
        except KeyboardInterrupt:
            print("\nbye", file=out, flush=True)
            return 0
        if not line:
            continue
        if line.startswith("/"):
            msg, quit_ = session.command(line)
            print(msg, file=out, flush=True)
            if quit_:
                return 0
            continue
        reply = session.respond(line)
        tag = f"[{reply.mode}] " if session.mode == "auto" and reply.mode else ""
        print(f"{BOT}{tag}{session.render(reply)}", file=out, flush=True)


def run_chat(session: ChatSession, *, interactive: bool | None = None) -> int:
    """Terminal loop if stdin is a tty (or ``interactive=True``), else the pipe loop."""
    if interactive is None:
        interactive = sys.stdin.isatty()
    if interactive:
        return run_terminal(session, sys.stdout)
    return run_pipe(session, sys.stdin, sys.stdout, sys.stderr)
