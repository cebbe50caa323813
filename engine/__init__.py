"""What train.py is made of: configuration, the step, checkpoints, tracking, torchrun setup."""
