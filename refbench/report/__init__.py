"""The report stage: result records and the papers' reported rows -> tables and pages.

    leaderboard     `refbench leaderboard`: measured and reported rows -> md, csv, json, html
    templates/      the leaderboard page (Jinja2, autoescaped), package data
    console         console listings (`refbench models`)

Imports refbench.eval, the root modules and refbench.models; nothing above.
"""

from __future__ import annotations

import importlib

_EXPORTS = {  # public name -> the module of this package that defines it
    "build_table": "leaderboard",
    "load_reported": "leaderboard",
    "load_ablations": "leaderboard",
    "render": "leaderboard",
    "to_markdown": "leaderboard",
    "to_csv": "leaderboard",
    "to_json": "leaderboard",
    "to_html": "leaderboard",
    "print_models": "console",
}


def __getattr__(name: str):
    """The names above, imported from their module on first use (so `import refbench.report` stays light)."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
