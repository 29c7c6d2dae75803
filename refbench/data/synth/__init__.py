"""`refbench synth`: the embedded synthetic dataset in the exact raw refer format.

    generate        the dataset: splits, refs, instances.json, JPEGs (and parquet mirrors)
    scene           scenes of coloured shapes in two groups
    language        the sentences that name one shape among distractors
    render          the images
"""
