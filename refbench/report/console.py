"""Small rich printers shared by CLI commands (model listing and the like)."""

from __future__ import annotations

import dataclasses

from rich.console import Console
from rich.table import Table

from refbench import models

console = Console()


def print_models() -> None:
    """Print every registered model (built in, entry points) with where it came from, its variants and
    config fields; a plug-in that fails to load gets one line saying why and does not hide the others."""
    table = Table(title=f"registered models (refbench.models; plug-ins: entry-point group {models.ENTRY_POINT_GROUP!r})")
    table.add_column("model")
    table.add_column("from")
    table.add_column("variants")
    table.add_column("config fields")
    table.add_column("description")
    broken = []
    for name in models.names():
        try:
            spec = models.get_spec(name)
        except models.ModelError as e:
            broken.append(str(e))
            table.add_row(name, models.origin(name), "-", "-", "[red]broken plug-in: does not load[/]")
            continue
        fields = ", ".join(f.name for f in dataclasses.fields(spec.config))
        table.add_row(name, models.origin(name), ", ".join(spec.variants), fields, spec.description)
    console.print(table)
    for line in broken:
        Console(stderr=True).print(f"[yellow]warning:[/] {line}", highlight=False, soft_wrap=True)
