"""The report stage: result records and the papers' reported rows -> tables and pages.

    leaderboard     `refbench leaderboard`: measured and reported rows -> md, csv, json, html
    templates/      the leaderboard page (Jinja2, autoescaped), package data
    console         console listings (`refbench models`)

Imports refbench.eval, the root modules and refbench.models; nothing above.
"""

from __future__ import annotations

from refbench import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
