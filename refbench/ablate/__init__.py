"""`refbench ablate`: EAVL's Tables 2-4 on the synthetic RefCOCO+ split.

    plan            the configurations of the paper's tables as data (AblationConfig, Setting, Row, Run)
    run             train and score each run (resumable)
    report          our numbers beside the paper's: report.md and the Nq plot

Imports refbench.report, refbench.train, refbench.eval, refbench.data and the root modules.
"""

from __future__ import annotations

from refbench import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
