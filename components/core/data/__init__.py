"""Tokenizer and chat format, packed token shards, and the readers of raw records."""
