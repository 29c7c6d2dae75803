"""`refbench ablate`: EAVL's Tables 2-4 on the synthetic RefCOCO+ split.

    plan            the configurations of the paper's tables as data (AblationConfig, Setting, Row, Run)
    run             train and score each run (resumable)
    report          our numbers beside the paper's: report.md and the Nq plot

Imports refbench.report, refbench.train, refbench.eval, refbench.data and the root modules.
"""

from __future__ import annotations

import importlib

_EXPORTS = {  # public name -> the module of this package that defines it
    "AblationConfig": "plan",
    "Setting": "plan",
    "Row": "plan",
    "Run": "plan",
    "plan_runs": "plan",
    "table_rows": "plan",
    "run_ablation": "run",
    "ensure_data": "run",
    "Report": "report",
    "build_report": "report",
    "render_report": "report",
}


def __getattr__(name: str):
    """The names above, imported from their module on first use (so `import refbench.ablate` stays light)."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
