"""Llama 2 in plain PyTorch: attention masks, generation, Hugging Face checkpoints in and out."""
