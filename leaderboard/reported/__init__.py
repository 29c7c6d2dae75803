"""Published rows shipped with refbench as package data (`refbench.reported`).

The CSV files beside this module (refcoco_family.csv, ablations/eavl.csv) and their README are
read at run time through `importlib.resources.files("refbench.reported")`, so an installed
wheel finds them from any working directory. A `--reported PATH` given by the user wins.
"""
