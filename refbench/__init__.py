"""refbench: the reference harness for Referring Image Segmentation (RIS).

The data path reads in one direction, one module per stage:

    refer (raw REFER files) -> prepare (webdataset shards) -> data/transforms (loaders)
    -> refbench.models (registry) -> train / evaluate -> metrics -> results -> leaderboard

Modules import what they use at their top; `import refbench` itself imports nothing, and the
CLI imports a command's module only when that command runs, so `refbench --help` needs neither
torch nor open_clip.
"""

__version__ = "0.1.0"
