"""refbench: the reference harness for Referring Image Segmentation (RIS).

The data path reads in one direction, one module per stage:

    refer (raw REFER files) -> prepare (webdataset shards) -> data/transforms (loaders)
    -> models/ (registry) -> train / evaluate -> metrics -> results -> leaderboard

Heavy libraries (torch, open_clip, webdataset, polars) are imported inside the functions that
need them, so `import refbench` and `refbench --help` stay fast.
"""

__version__ = "0.1.0"
