"""Packing with document positions: rows cut from one stream, positions restarting per document,
and a packed forward that equals each document's own forward."""

from __future__ import annotations

from pathlib import Path

import torch

from heed.data.collate import pack, packed_positions, pad_positions


def _doc(n: int, start: int) -> tuple[list[int], list[bool]]:
    return list(range(start, start + n)), [True] * n


def test_positions_restart_per_document_and_follow_the_rows() -> None:
    # documents of 3, 4 and 2 tokens -> stream positions 0 1 2 | 0 1 2 3 | 0 1; rows of 4:
    # [0 1 2 0] [1 2 3 0] [1]; the last row has one token and is dropped (nothing to predict)
    docs = [_doc(3, 10), _doc(4, 20), _doc(2, 30)]
    rows = pack(docs, 4)
    pos = packed_positions(docs, 4)
    assert [r[0] for r in rows] == [[10, 11, 12, 20], [21, 22, 23, 30]]
    assert pos == [[0, 1, 2, 0], [1, 2, 3, 0]]  # document 2 continues its count in row 2
    assert len(rows) == len(pos)


def test_pad_positions_continue_each_row() -> None:
    out = pad_positions([[0, 1, 0], [5, 6, 7, 8, 9]])
    assert out.tolist() == [[0, 1, 0, 1, 2], [5, 6, 7, 8, 9]]


def test_packed_forward_equals_separate_documents(micro_sft_model: Path) -> None:
    from heed.models.lm import sequence_logprobs
    from heed.models.loading import load_causal_lm

    model = load_causal_lm(micro_sft_model).eval()
    docs = [_doc(5, 40), _doc(6, 70), _doc(4, 100)]
    rows = pack(docs, 15)
    ids = torch.tensor([rows[0][0]])
    target = torch.ones_like(ids, dtype=torch.bool)
    target[:, 0] = False
    with torch.no_grad():
        packed, _ = sequence_logprobs(
            model, ids, torch.ones_like(ids), target, position_ids=pad_positions(packed_positions(docs, 15))
        )
        crossing, _ = sequence_logprobs(model, ids, torch.ones_like(ids), target)
        start = 0
        for toks, _ in docs:
            one = torch.tensor([toks])
            t = torch.ones_like(one, dtype=torch.bool)
            t[:, 0] = False
            alone, _ = sequence_logprobs(model, one, torch.ones_like(one), t)
            # a document's own tokens (after its first, which the packed row predicts from the previous one)
            seg = slice(start + 1, start + len(toks))
            torch.testing.assert_close(packed[0, seg], alone[0, 1:], atol=1e-5, rtol=1e-5)
            start += len(toks)
    assert not torch.allclose(
        packed[0, 6:11], crossing[0, 6:11], atol=1e-3
    )  # GPT-style packing sees document 1
