"""Batching token sequences: padding (left or right), packing, and length-grouped order."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

Encoded = tuple[list[int], list[bool]]


def pad_batch(
    seqs: Sequence[Encoded], pad_id: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad ``(ids, loss_mask)`` pairs to one length.

    Returns ``input_ids (B, T)``, ``attention_mask (B, T)`` (1 on real tokens) and
    ``loss_mask (B, T)`` (True where a token is trained on).
    """
    width = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (ids, mask) in enumerate(seqs):
        n = len(ids)
        sl = slice(0, n) if side == "right" else slice(width - n, width)
        input_ids[i, sl] = torch.tensor(ids, dtype=torch.long)
        attention[i, sl] = 1
        loss_mask[i, sl] = torch.tensor(mask, dtype=torch.bool)
    return input_ids, attention, loss_mask


def truncate(seqs: Sequence[Encoded], max_length: int) -> tuple[list[Encoded], int]:
    """Cut sequences to ``max_length`` tokens; returns them and how many were cut."""
    out, cut = [], 0
    for ids, mask in seqs:
        if len(ids) > max_length:
            cut += 1
            ids, mask = ids[:max_length], mask[:max_length]
        out.append((ids, mask))
    return out, cut


def _rows(stream: list, max_length: int) -> list[list]:
    """``stream`` cut into rows of ``max_length``; a last row of one token (nothing to predict) is dropped."""
    return [stream[s : s + max_length] for s in range(0, len(stream), max_length) if len(stream) - s >= 2]


def pack(seqs: Sequence[Encoded], max_length: int) -> list[Encoded]:
    """Concatenate documents (each already ends with EOS) and cut the stream into rows of
    ``max_length`` tokens, so no compute is spent on padding. By itself attention crosses document
    boundaries (GPT-style pretraining); with :func:`packed_positions` it stays inside each one."""
    ids = [t for i, _ in seqs for t in i]
    mask = [m for _, ms in seqs for m in ms]
    return list(zip(_rows(ids, max_length), _rows(mask, max_length), strict=True))


def packed_positions(seqs: Sequence[Encoded], max_length: int) -> list[list[int]]:
    """Position ids of :func:`pack`'s rows, row for row: each document counts from 0, so a forward
    given them (and no attention mask) attends within documents only (transformers reads a restart
    of the positions as a new sequence). A document cut between two rows continues its count."""
    return _rows([p for ids, _ in seqs for p in range(len(ids))], max_length)


def pad_positions(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """Right-pad position rows to one width (B, T); padding continues each row's count, so it
    reads as the tail of the row's last document (causal attention keeps it out of real tokens)."""
    width = max(len(r) for r in rows)
    out = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        if len(r) < width:
            out[i, len(r) :] = torch.arange(r[-1] + 1, r[-1] + 1 + width - len(r))
    return out


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, seed: int, mega: int = 50
) -> list[list[int]]:
    """Shuffled batches of indices whose members have similar lengths (less padding).

    Indices are shuffled, cut into groups of ``mega`` batches, sorted by length inside each
    group, split into batches, and the batches shuffled again: random yet tight.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    span = batch_size * mega
    for start in range(0, len(order), span):
        group = sorted(order[start : start + span], key=lambda i: lengths[i], reverse=True)
        batches += [group[j : j + batch_size] for j in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches
