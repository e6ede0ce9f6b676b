"""The recipe's registry of stages, config composition and run identity."""
