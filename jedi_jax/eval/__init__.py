"""Evaluation of personalization: on the mini world (MiniBench) and on real photos (DreamBench).

    identity_encoder.py     contrastive identity CNN (DreamBench's DINO score, ours), shipped weights
    context_classifier.py   background / placement / size / orientation CNN (prompt fidelity), shipped
    cnn.py                  the small CNN both use, host-side augmentations, weight files
    metrics.py              per-image scores, normalization, bootstrap CIs
    dreambooth.py           the finetuning baseline (same model, plain denoising loss)
    protocol.py             MiniBench's cases, paired seeds, one generation, scoring (shared by all below)
    cli.py                  argument parsing shared by the evaluation CLIs
    minibench.py            the benchmark: `python -m jedi_jax.eval.minibench`, and `quick_identity`
                            for training learning curves
    learning_curve.py       quick identity of every checkpoint of a run
    prompt_probe.py         text-only prompt following, split by wording and seen / held-out pairs
    guidance_sweep.py       sT x sI on validation subjects (MiniBench's are never used to choose)
    dreambooth_curve.py     identity against wall time, JeDi vs DreamBooth at many budgets
    dreambench.py           DreamBooth's benchmark of real photos: `python -m jedi_jax.eval.dreambench`
                            (DINO, CLIP-I, CLIP-T with CIs; resumable)
    image_text_embedders.py DreamBench's DINO and CLIP scorers (models/vit.py), loaded strictly from
                            Hugging Face folders; parity with transformers in tests
"""
