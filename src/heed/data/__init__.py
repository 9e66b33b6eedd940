"""Data: record schemas, loading with file:line errors, chat templating, collators."""

from heed.data.io import read_records, write_jsonl
from heed.data.records import (
    ParseOptions,
    PreferenceGroup,
    PromptExample,
    SFTExample,
    TextExample,
    UnpairedExample,
    check_ranked_group,
    load_records,
    parse_records,
    prompt_text,
)

__all__ = [
    "ParseOptions",
    "PreferenceGroup",
    "PromptExample",
    "SFTExample",
    "TextExample",
    "UnpairedExample",
    "check_ranked_group",
    "load_records",
    "parse_records",
    "prompt_text",
    "read_records",
    "write_jsonl",
]
