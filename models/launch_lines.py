"""Reading an official launch line's argv, for a family's `translate_argv`.

An official line is rewritten option by option, so it is first cut into items: `[option, values...]`
for an option and the tokens after it, `[token]` for a positional. A negative number (`-1`, `-1e-4`)
is a value, not an option. DynamicViT and TokenReduction translate their lines on these items.
"""
from typing import List, Sequence

__all__ = ["is_number", "split_items"]


def is_number(token: str) -> bool:
    """True when `token` reads as a float (`-1`, `1e-4`, `inf`)."""
    try:
        float(token)
        return True
    except ValueError:
        return False


def split_items(argv: Sequence[str]) -> List[List[str]]:
    """argv as [option, values...] / [positional] items (`--a=b` becomes ['--a', 'b']); joining the
    items' tokens gives argv back, apart from the `=` split."""
    items: List[List[str]] = []
    for token in argv:
        if token.startswith("--") and "=" in token:
            items.append(token.split("=", 1))
        elif token.startswith("-") and not is_number(token):
            items.append([token])
        elif items and items[-1][0].startswith("-"):
            items[-1].append(token)
        else:
            items.append([token])
    return items
