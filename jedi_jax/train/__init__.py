"""Training: input pipeline (loader.py), losses, train step, configs."""
