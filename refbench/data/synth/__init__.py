"""`refbench synth`: the embedded synthetic dataset."""
