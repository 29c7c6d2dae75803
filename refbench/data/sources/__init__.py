"""Raw sources of refer datasets: refer (the refer toolkit's files) and hf (the Hugging Face parquet mirrors)."""
