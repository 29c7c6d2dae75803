"""`refbench ablate`: EAVL's Tables 2-4 on synthetic data."""
