"""Raw sources of refer datasets: refer (the refer toolkit's files), hf (the Hugging Face parquet mirrors), grefer (gRefCOCO's grefs and instances.json)."""
