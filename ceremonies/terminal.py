"""The terminal the participants sit at: prompts, confirmations, and shares typed without echo.

Shares are read with ``getpass`` (no echo) and returned to the caller, which submits them and
drops them; nothing here keeps or logs what was typed. A share shown on screen (at init) is
followed by clearing the screen once its holder confirms they have written it down.
"""

from __future__ import annotations

import getpass
import sys
from typing import TextIO

CLEAR = "\033[2J\033[3J\033[H"


class EndOfInputError(Exception):
    """The terminal closed (end of input): the run stops where it is; the journal keeps it."""


class Terminal:
    def __init__(self, stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
        self._in = stdin or sys.stdin
        self._out = stdout or sys.stdout

    def say(self, text: str = "") -> None:
        print(text, file=self._out, flush=True)

    def heading(self, text: str) -> None:
        self.say()
        self.say(text)
        self.say("-" * min(len(text), 78))

    def ask(self, prompt: str, *, default: str = "", allow_empty: bool = False) -> str:
        shown = f"{prompt} [{default}]: " if default else f"{prompt}: "
        while True:
            self._out.write(shown)
            self._out.flush()
            line = self._in.readline()
            if not line:
                raise EndOfInputError
            answer = line.strip() or default
            if answer or allow_empty:
                return answer
            self.say("An answer is needed.")

    def confirm(self, prompt: str) -> bool:
        while True:
            answer = self.ask(f"{prompt} [y/n]").lower()
            if answer in ("y", "yes"):
                return True
            if answer in ("n", "no"):
                return False
            self.say("Answer y or n.")

    def choose(self, prompt: str, options: dict[str, str]) -> str:
        """One of ``options`` (letter: meaning), by its letter."""
        listed = ", ".join(f"{k} = {v}" for k, v in options.items())
        while True:
            answer = self.ask(f"{prompt} ({listed})").lower()
            if answer in options:
                return answer
            self.say(f"Answer one of: {', '.join(options)}.")

    def secret(self, prompt: str) -> str:
        """A line typed without echo; empty if the participant just pressed Enter."""
        try:
            return getpass.getpass(prompt, stream=self._out).strip()
        except EOFError:
            raise EndOfInputError from None

    def clear(self) -> None:
        self._out.write(CLEAR)
        self._out.flush()
