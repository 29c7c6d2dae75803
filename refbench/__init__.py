"""refbench: the reference harness for Referring Image Segmentation (RIS).

The data path reads in one direction, one package per stage, each importing only those below:

    refbench.data (raw refer files -> prepare -> shards -> loaders) -> refbench.models (registry)
    -> refbench.eval (metrics, scoring, records) -> refbench.train (the loop, runs)
    -> refbench.report (leaderboard), refbench.ablate, refbench.bench -> refbench.cli, quickstart

Modules import what they use at their top; `import refbench` itself imports nothing, each
package's face (its `__init__`) imports a module only when one of its names is first used
(`lazy_exports`), and the CLI imports a command's module only when that command runs, so
`refbench --help` needs neither torch nor open_clip.
"""

__version__ = "0.1.0"


def lazy_exports(package: str, exports: dict[str, str]):
    """A package face's `(__getattr__, __dir__)`: each name of `exports` (public name -> the
    package's module that defines it) is imported from its module on first use."""
    import importlib
    import sys

    def __getattr__(name: str):
        if name in exports:
            return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__
