"""The built-in tiny model: a byte-level BPE tokenizer trained on the corpus and a small
Llama-style decoder (a few million parameters), both saved in Hugging Face format.

Nothing is downloaded: the tokenizer is trained with the ``tokenizers`` library, the model
is built from a config with random weights and then pretrained by ``heed pretrain``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

PAD, EOS, UNK = "<|pad|>", "<|end|>", "<|unk|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]
SPECIAL_TOKENS = [PAD, EOS, UNK, *ROLE_TOKENS]

# Each turn: "<|role|>\n{content}<|end|>\n"; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Named sizes for the Llama-style decoder; "tiny" is the built-in default.
SIZES: dict[str, dict[str, int]] = {
    "micro": {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2, "num_attention_heads": 4},
    "tiny": {"hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 6},
    "small": {
        "hidden_size": 384,
        "intermediate_size": 1024,
        "num_hidden_layers": 6,
        "num_attention_heads": 6,
    },
    "100m": {
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
    },
}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2) -> Any:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``
    with Heed's chat template, ``<|end|>`` as EOS and ``<|pad|>`` as padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=ROLE_TOKENS,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 1024
    return fast


def tiny_llama_config(
    tokenizer: Any, size: str = "tiny", max_position_embeddings: int = 512, **overrides: Any
) -> Any:
    """A ``LlamaConfig`` of a named size whose vocabulary and special ids match ``tokenizer``."""
    from transformers import LlamaConfig

    if size not in SIZES:
        from heed.errors import ConfigError

        raise ConfigError(f"model.size: unknown size {size!r}; expected one of {', '.join(SIZES)}")
    dims = {**SIZES[size], **overrides}
    heads = dims["num_attention_heads"]
    return LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_position_embeddings,
        num_key_value_heads=dims.pop("num_key_value_heads", heads),
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        attention_dropout=0.0,
        **dims,
    )


def build_model(config: Any, seed: int = 0) -> Any:
    """Randomly initialised ``LlamaForCausalLM`` from ``config`` (deterministic for a seed)."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    return model


def tiny_encoder_config(tokenizer: Any, size: str = "tiny", num_labels: int = 1, **overrides: Any) -> Any:
    """A small BERT-style encoder config (for encoder reward models and classifiers)."""
    from transformers import BertConfig

    dims = {**SIZES[size], **overrides}
    return BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=dims["hidden_size"],
        intermediate_size=dims["intermediate_size"],
        num_hidden_layers=dims["num_hidden_layers"],
        num_attention_heads=dims["num_attention_heads"],
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
