"""Stage `data_prep`: corpus cleaning, the SentencePiece tokenizer, token shards, SFT / preference / prompt data."""
