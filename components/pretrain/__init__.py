"""Stage `pretrain`: FSDP pretraining of Llama on the data prep stage's token shards (see stage.py)."""
