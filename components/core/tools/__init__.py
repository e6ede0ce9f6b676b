"""The tools commands (generate, export-hf, plan, config): the top core layer, above train, model and recipe."""
