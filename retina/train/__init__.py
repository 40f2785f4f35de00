"""Training (train_nn.py): the loop and the run folder (checkpoints, log, resume)."""
