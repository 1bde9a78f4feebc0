"""Data: the procedural mini world, its tokenizer files, TFDS same-subject sets and set sources, and
the tools that turn photo collages and photo folders into set data sets."""
