"""Training JeDi (issue 4: "Training at scale").

    python -m jedi_jax.train --config configs/sd15.py:tiny --workdir DIR      (see launch/README.md)

    trainer.py     the loop: validate, build, restore-or-init, AOT compile, log, checkpoint, SIGTERM
    step.py        the JeDi loss (Sec. 3) and the jitted/sharded/donated train step, FLOPs -> MFU
    state.py       TrainState, AdamW + warmup/cosine + clipping (+ MultiSteps), sharded init, EMA
    sharding.py    mesh from config, logical-axis rules (data) -> parameter / batch shardings
    checkpoint.py  orbax CheckpointManager (async, last K + best), pre-emption guard
    models.py      the networks from config (random) and/or a converted folder (jedi_jax.loading)
    data.py        source + tokenizer for loader.py's SetLoader
    loader.py      the set input pipeline (deterministic, process-sharded, checkpointable)
    hooks.py       sample grids during training (jedi_jax.sampling)
    bench.py       train-step throughput / MFU on a synthetic batch
    vae_trainer.py JeDi-mini part 1: the mini-world VAE
"""
