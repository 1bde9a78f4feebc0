"""Training configs: `python -m jedi_jax.train --config configs/<file>.py:<variant> --workdir DIR`."""
