"""Raw sources of refer datasets."""
