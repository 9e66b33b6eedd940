"""Data: record schemas, loading with file:line errors, chat templating, collators."""

from heed.data.io import read_records, write_jsonl
from heed.data.records import (
    PreferenceGroup,
    PromptExample,
    SFTExample,
    TextExample,
    load_records,
    parse_records,
    prompt_text,
)

__all__ = [
    "PreferenceGroup",
    "PromptExample",
    "SFTExample",
    "TextExample",
    "load_records",
    "parse_records",
    "prompt_text",
    "read_records",
    "write_jsonl",
]
