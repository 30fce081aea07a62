"""Training: typed configs, the trainer loop, checkpoints, optimisers and logs."""
