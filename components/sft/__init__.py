"""Stage `sft`: supervised fine-tuning on packed dialogs, loss on answer tokens only (paper §3.1)."""
