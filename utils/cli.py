"""What every command line of the project shares: one-line argument errors, both spellings of
every long flag, and close matches for a misspelt name.

main.py (`arguments.py`), benchmark.py and the tools (`tools/_common.py`) use these three, so
a bad flag reads the same everywhere: one line naming the problem and where to look, exit
status 2 (the scripts catch `UserError`), never a usage dump.
"""
from __future__ import annotations

import argparse
import difflib
from typing import Iterable

from utils.errors import UserError

__all__ = ["OneLineParser", "spellings", "add_spelling_aliases", "close_matches", "close_matches_text",
           "import_plugins"]


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one `UserError` line ending "(see <help_hint> --help)".

    `help_hint`: how the user reaches the help ("python main.py"); empty: just "--help".
    """

    def __init__(self, *args, help_hint: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.help_hint = help_hint

    def error(self, message):
        raise UserError(f"{message} (see {self.help_hint + ' ' if self.help_hint else ''}--help)")


def spellings(*names: str) -> list:
    """Each long flag given in its `--a-b` and `--a_b` spelling (order kept, no duplicates);
    short flags as they are."""
    out = []
    for name in names:
        variants = [name]
        if name.startswith("--"):
            body = name[2:]
            variants += ["--" + body.replace("_", "-"), "--" + body.replace("-", "_")]
        for variant in variants:
            if variant not in out:
                out.append(variant)
    return out


def add_spelling_aliases(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every long option of `parser` also under its other spelling ('--output-dir' and '--output_dir');
    for parsers whose options were declared in one spelling. Returns the parser."""
    for action in parser._actions:  # argparse has no public action list
        for option in list(action.option_strings):
            if not option.startswith("--"):
                continue
            for variant in spellings(option)[1:]:
                if variant not in parser._option_string_actions:
                    action.option_strings.append(variant)
                    parser._option_string_actions[variant] = action
    return parser


def import_plugins(argv) -> None:
    """`--plugin MODULE` (repeatable): researchers' own method-family modules, imported before a
    parser is built so their models and flags exist (main.py, benchmark.py, the tools)."""
    import sys

    from models import family
    from models.errors import ModelConfigError

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--plugin", action="append", default=[])
    known, _ = pre.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    try:
        family.import_plugins(known.plugin)
    except ModelConfigError as err:
        raise UserError(str(err)) from None


def close_matches(word: str, options: Iterable[str], n: int = 5, cutoff: float = 0.5) -> list:
    """The entries of `options` closest to `word` (difflib), best first."""
    return difflib.get_close_matches(word, list(options), n=n, cutoff=cutoff)


def close_matches_text(word: str, options: Iterable[str], n: int = 5, cutoff: float = 0.5) -> str:
    """`close_matches` as "a, b, c", or "none"."""
    return ", ".join(close_matches(word, options, n, cutoff)) or "none"
