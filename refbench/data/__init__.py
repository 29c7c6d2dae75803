"""The data stage: raw refer files -> prepared webdataset shards -> batches."""
