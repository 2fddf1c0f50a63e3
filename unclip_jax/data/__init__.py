"""Data: the built-in `shapes` set, image-text datasets, embedding shards and the input pipeline."""
