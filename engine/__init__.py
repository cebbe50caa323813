"""The pieces train.py is made of: configuration, builders, the step, checkpoints, tracking."""
