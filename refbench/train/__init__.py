"""The train stage: recipes, the training loop, runs side by side."""
