"""Corpus -> tokenizer -> token shards -> resumable loader."""
