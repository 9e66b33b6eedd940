"""Bad data is one clear line (a DataError naming file:line, 1-based), and what cannot train is refused.

Files: encodings, binary and corrupt files, FIFOs and devices, symlinks, malformed and duplicated
JSON. Records: contradictory rankings (one rule for the reward model and DPO), empty answers,
negative weights, prompts that fill max_length, and records longer than anything max_length reaches.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from heed.data.collate import truncate
from heed.data.io import read_records, write_jsonl
from heed.data.records import ParseOptions, SFTExample, load_records, max_chars_for
from heed.data.templating import encode_sft
from heed.errors import DataError

PAIR = {"prompt": "Tell me about tea.", "chosen": "Tea is lovely.", "rejected": "Tea is bad."}
PAIR_LINE = json.dumps(PAIR)


def one_line_error(fn: Callable[[], object]) -> str:
    with pytest.raises(DataError) as err:
        fn()
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


# --- files -----------------------------------------------------------------------------------------
def _bytes_cases() -> list[tuple[str, str, bytes, list[str]]]:
    good = (PAIR_LINE + "\n").encode()
    return [
        # (id, file name, content, fragments the message must hold)
        ("utf16-bom", "d.jsonl", (PAIR_LINE + "\n").encode("utf-16"), ["UTF-16 text", "iconv -f UTF-16"]),
        ("utf16-no-bom", "d.jsonl", (PAIR_LINE + "\n").encode("utf-16-le"), ["UTF-16 text without"]),
        (
            "latin1-byte",
            "d.jsonl",
            good + json.dumps({**PAIR, "prompt": "Caf\u00e9?"}, ensure_ascii=False).encode("latin-1"),
            [":2: not UTF-8 (byte 0xe9 at byte 16 of the line)", "iconv -f LATIN1 -t UTF-8"],
        ),
        (
            "binary-renamed",
            "d.jsonl",
            b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
            [":3: binary data (a NUL byte at byte 1 of the line)"],
        ),
        ("utf32", "d.json", ("[" + PAIR_LINE + "]").encode("utf-32"), ["UTF-32 text"]),
        (
            "unterminated-string",
            "d.jsonl",
            good + b'{"prompt": "Tell me\n',
            [":2: malformed JSON (Unterminated string starting at column 12)"],
        ),
        (
            "jsonl-in-json",
            "d.json",
            good + good,
            [":2: more text after the end of the first JSON value", "looks like JSON Lines", ".jsonl"],
        ),
        (
            "duplicate-key-jsonl",
            "d.jsonl",
            good + b'{"prompt": "a", "chosen": "b", "rejected": "c", "chosen": "d"}\n',
            [":2: key 'chosen' appears twice in one object"],
        ),
        (
            "duplicate-key-json",
            "d.json",
            b"[\n" + PAIR_LINE.encode() + b',\n{"prompt": "a", "prompt": "b"}\n]',
            ["d.json:3: key 'prompt' appears twice"],
        ),
        (
            "json-bad-element",
            "d.json",
            b"[\n" + PAIR_LINE.encode() + b",\n7\n]",
            ["d.json:3: expected a JSON object"],
        ),
        (
            "corrupt-parquet",
            "d.parquet",
            b"PAR1" + b"\x15\x04" * 40 + b"PAR1",
            ["not a readable Parquet file"],
        ),
        ("text-as-parquet", "d.parquet", good, ["not a readable Parquet file", "magic bytes"]),
    ]


@pytest.mark.parametrize(
    ("name", "content", "expected"), [c[1:] for c in _bytes_cases()], ids=[c[0] for c in _bytes_cases()]
)
def test_bad_files_are_one_line(tmp_path: Path, name: str, content: bytes, expected: list[str]) -> None:
    p = tmp_path / name
    p.write_bytes(content)
    msg = one_line_error(lambda: load_records(p, "preferences"))
    assert msg.startswith(str(p)), msg
    for fragment in expected:
        assert fragment in msg, msg


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    for name, text in (("d.jsonl", PAIR_LINE + "\n"), ("d.json", f"[{PAIR_LINE}]")):
        p = tmp_path / name
        p.write_bytes(b"\xef\xbb\xbf" + text.encode())
        (g,) = load_records(p, "preferences")
        assert g.prompt == PAIR["prompt"] and g.where == f"{p}:1"


def test_json_records_are_located_by_line(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    p.write_text("[\n  " + PAIR_LINE + ",\n\n  " + PAIR_LINE + "\n]\n", encoding="utf-8")
    assert [r.where for r in read_records(p)] == [f"{p}:2", f"{p}:4"]
    # several records on one line: file:line:column
    p.write_text(json.dumps({"data": [PAIR, PAIR]}), encoding="utf-8")
    assert [r.where for r in read_records(p)] == [f"{p}:1:11", f"{p}:1:{11 + len(PAIR_LINE) + 2}"]


def test_special_files_and_symlinks(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)  # opening it would block until a writer comes: it must be refused unopened
    assert "a FIFO (named pipe), not a regular file" in one_line_error(lambda: load_records(fifo, "prompts"))
    assert "a character device" in one_line_error(lambda: load_records("/dev/null", "prompts"))
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(loop)
    assert one_line_error(lambda: load_records(loop, "prompts")).endswith(
        "a symbolic link loop (the link leads back to itself)"
    )
    dangling = tmp_path / "dangling.jsonl"
    dangling.symlink_to(tmp_path / "gone.jsonl")
    assert f"a symbolic link to {tmp_path / 'gone.jsonl'}, which does not exist" in one_line_error(
        lambda: load_records(dangling, "prompts")
    )


def test_annotate_import_reads_through_the_data_layer(tmp_path: Path) -> None:
    from heed.feedback.records import iter_records

    p = tmp_path / "records.parquet"
    p.write_bytes(b"PAR1" + b"\x00" * 64 + b"PAR1")
    assert "not a readable Parquet file" in one_line_error(lambda: list(iter_records(p)))
    p = tmp_path / "records.jsonl"
    p.write_bytes((PAIR_LINE + "\n").encode("utf-16"))
    assert "UTF-16 text" in one_line_error(lambda: list(iter_records(p)))


def test_datasets_folder_splits(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    DatasetDict(
        {"train_prefs": Dataset.from_list([PAIR]), "test_prefs": Dataset.from_list([PAIR])}
    ).save_to_disk(str(tmp_path / "uf"))
    msg = one_line_error(lambda: read_records(tmp_path / "uf"))
    assert msg.endswith("a DatasetDict with splits train_prefs, test_prefs: set data.split to one of them")
    msg = one_line_error(lambda: read_records(tmp_path / "uf", "train"))
    assert "data.split='train': no such split (this DatasetDict has train_prefs, test_prefs)" in msg
    assert read_records(tmp_path / "uf", "test_prefs")[0].where == f"{tmp_path / 'uf' / 'test_prefs'}: row 0"
    p = tmp_path / "d.jsonl"
    write_jsonl(p, [PAIR])
    assert "picks a split of a datasets folder, but this is a file" in one_line_error(
        lambda: read_records(p, "x")
    )


def test_unknown_shape_names_its_columns_and_the_accepted_ones(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    write_jsonl(p, [{"question_text": "q", "answer_a": "x", "answer_b": "y", "winner": "a"}])
    msg = one_line_error(lambda: load_records(p, "preferences"))
    assert msg.startswith(
        f"{p}:1: no preference data in the columns answer_a, answer_b, question_text, winner"
    )
    assert "prompt + chosen + rejected" in msg and "HH-RLHF" in msg and "Argilla" in msg
    msg = one_line_error(lambda: load_records(p, "sft"))
    assert "no SFT data in the columns" in msg and "messages (a chat), or prompt + completion" in msg


# --- records that cannot train --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("record", "kind", "expected"),
    [
        (
            {"prompt": "p", "responses": ["a", "b", "a"], "ranks": [1, 2, 3]},
            "preferences",
            "responses[0] and responses[2]: the same answer is ranked 1 and 3 (no preference to learn)",
        ),
        (
            {"instruction": "p", "generations": ["a", "a"], "ratings": [5, 2]},
            "preferences",
            "responses[0] and responses[1]: the same answer is ranked 1 and 4",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
            "sft",
            "messages: every assistant message is empty: nothing to learn from",
        ),
        (
            {**PAIR, "weight": -1},
            "preferences",
            "weight: -1 is negative: it would train towards the worse answer; fix the data or set "
            "data.allow_negative_weights: true",
        ),
        (
            {"prompt": "p", "responses": ["a", "b"], "ranks": [1, 2], "weight": -0.5},
            "preferences",
            "weight: -0.5 is negative",
        ),
        (
            {"chosen": "Tea is lovely.", "rejected": "Tea is bad."},
            "preferences",
            "chosen: a string answer needs a prompt column",
        ),
        (
            {
                "prompt": "p",
                "chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}],
            },
            "preferences",
            "rejected: continues a different conversation",
        ),
    ],
)
def test_records_that_cannot_train_are_refused(
    tmp_path: Path, record: dict, kind: str, expected: str
) -> None:
    p = tmp_path / "d.jsonl"
    write_jsonl(p, [PAIR if kind == "preferences" else {"prompt": "q", "completion": "a"}, record])
    msg = one_line_error(lambda: load_records(p, kind))  # type: ignore[arg-type]
    assert msg.startswith(f"{p}:2: ") and expected in msg, msg


def test_negative_weights_pass_with_the_flag(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    write_jsonl(p, [{**PAIR, "weight": -1}])
    (g,) = load_records(p, "preferences", options=ParseOptions(allow_negative_weights=True))
    assert g.weight == -1.0


@pytest.mark.filterwarnings("ignore:.*were truncated")
def test_rm_train_refuses_what_dpo_refuses(tmp_path: Path, micro_sft_model: Path) -> None:
    from heed.config import config_from_dict
    from heed.config.reward import RMConfig
    from heed.train.reward import train_reward

    def rm(data: Path, **data_over: object) -> RMConfig:
        return config_from_dict(
            RMConfig,
            {
                "model": {"path": str(micro_sft_model)},
                "data": {"train": str(data), "eval_split": 0, **data_over},
                "train": {"max_steps": 1, "batch_size": 2},
                "log": {"progress": False},
                "out": str(tmp_path / f"run-{data.stem}"),
            },
        )

    same = tmp_path / "same.jsonl"
    write_jsonl(same, [PAIR, {"prompt": "p", "responses": ["x", "x"], "ranks": [1, 2]}])
    msg = one_line_error(lambda: train_reward(rm(same)))
    assert msg.startswith(f"{same}:2: responses[0] and responses[1]: the same answer is ranked 1 and 2")
    # a prompt longer than max_length leaves every response cut away: dropped and counted, then refused
    long = tmp_path / "long.jsonl"
    write_jsonl(long, [{**PAIR, "prompt": "Tell me about tea. " * 40}] * 3)
    with pytest.warns(UserWarning, match="3 groups dropped: differently ranked responses are identical"):
        msg = one_line_error(lambda: train_reward(rm(long, max_length=16)))
    assert msg == f"{long}: every group was dropped (see the warnings above); raise data.max_length"


@pytest.mark.filterwarnings("ignore:.*were truncated")
def test_sft_refuses_a_dataset_cut_away(tmp_path: Path, micro_sft_model: Path) -> None:
    from heed.config import config_from_dict
    from heed.config.sft import SFTConfig
    from heed.train.sft import train_sft

    p = tmp_path / "long.jsonl"
    write_jsonl(p, [{"prompt": "Tell me about tea. " * 20, "completion": "Tea."}] * 3)
    cfg = config_from_dict(
        SFTConfig,
        {
            "model": {"path": str(micro_sft_model)},
            "data": {"train": str(p), "eval_split": 0, "max_length": 16},
            "train": {"max_steps": 1},
            "log": {"progress": False},
            "out": str(tmp_path / "run"),
        },
    )
    assert "no sequence has a token to train on" in one_line_error(lambda: train_sft(cfg))


def test_rl_prompt_errors_name_file_and_line(tmp_path: Path, micro_sft_model: Path) -> None:
    from heed.models.loading import load_tokenizer
    from heed.rollout.generate import encode_prompts

    p = tmp_path / "prompts.jsonl"
    write_jsonl(p, [{"prompt": "Hi."}, {"prompt": "Hello."}, {"prompt": "Tell me about tea, " * 10}])
    ex = load_records(p, "prompts")
    tok = load_tokenizer(micro_sft_model)
    msg = one_line_error(
        lambda: encode_prompts(tok, [e.prompt for e in ex], True, 24, wheres=[e.where for e in ex])
    )
    assert msg.startswith(f"{p}:3: prompt: ") and "over the limit of 24" in msg


def test_long_records_are_cut_before_tokenizing_without_changing_what_trains(
    tmp_path: Path, micro_sft_model: Path
) -> None:
    from heed.models.loading import load_tokenizer

    tok = load_tokenizer(micro_sft_model)
    huge = "Tea is wonderful and full of joy. " * 30_000  # ~1 MB: far past what 32 tokens reach
    p = tmp_path / "huge.jsonl"
    write_jsonl(
        p, [{"prompt": "Tell me about tea.", "completion": huge}, {"prompt": "Hi.", "completion": "Hello."}]
    )
    with pytest.warns(UserWarning, match=r"1 records hold a text longer than 2048 characters; cut there"):
        cut, short = load_records(p, "sft", max_length=32)
    assert max_chars_for(32) == 2048 and len(cut.completion) == 2048 and short.completion == "Hello."
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when nothing is long
        load_records(p, "sft", max_length=len(huge))
    # what training sees (the first 32 tokens) is the same as from the whole record
    whole = SFTExample(prompt="Tell me about tea.", completion=huge[:200_000])
    (a,), _ = truncate([encode_sft(tok, cut, chat=True)], 32)
    (b,), _ = truncate([encode_sft(tok, whole, chat=True)], 32)
    assert a == b and len(a[0]) == 32
