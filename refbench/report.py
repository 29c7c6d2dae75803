"""Small rich printers shared by CLI commands (model listing and the like)."""

from __future__ import annotations

import dataclasses

from rich.console import Console
from rich.table import Table

console = Console()


def print_models() -> None:
    """Print every registered model with its variants and config fields."""
    from refbench import models

    table = Table(title="registered models (models.MODELS)")
    table.add_column("model")
    table.add_column("variants")
    table.add_column("config fields")
    table.add_column("description")
    for name in models.names():
        spec = models.get_spec(name)
        fields = ", ".join(f.name for f in dataclasses.fields(spec.config))
        table.add_row(name, ", ".join(spec.variants), fields, spec.description)
    console.print(table)
