"""Storage (local or s3:// through fsspec), safe names, JSONL and the one report writer."""
