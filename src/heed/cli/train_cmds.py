"""Trainer commands: pretrain, sft, generate."""
