"""Data: the procedural mini world, its tokenizer files, TFDS same-subject sets and set sources."""
