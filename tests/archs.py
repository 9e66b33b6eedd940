"""Tiny random-weight models of many architectures, built from configs (nothing is downloaded).

Every causal model shares the micro tokenizer's vocabulary and special ids, so any Heed command
runs on it. Encoders of the BERT family (``WORDPIECE``) get a small WordPiece ``BertTokenizerFast``
trained on the built-in corpus, which gives text pairs token types (0 for ``[CLS] a [SEP]``, 1 for
``b [SEP]``), so a Heed that dropped them would score differently; RoBERTa and ModernBERT keep the
micro byte-level BPE tokenizer. Sizes are as small as each architecture allows (hidden 32, 2 layers); sliding windows
are short (8 tokens) so that ordinary test sequences are longer than the window.

``causal_model_dir(name, root)`` / ``encoder_model_dir(name, root)`` save a model + tokenizer folder
in Hugging Face format and return its path (reused when it already exists).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

HIDDEN, LAYERS, HEADS, WINDOW = 32, 2, 4, 8

# name -> (config class, model class, config kwargs). Kwargs use each architecture's own names.
_COMMON = {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS}
_LLAMA_LIKE = {**_COMMON, "intermediate_size": 64, "num_key_value_heads": 2, "max_position_embeddings": 256}

CAUSAL: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _LLAMA_LIKE),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _LLAMA_LIKE),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_LLAMA_LIKE, "head_dim": 8}),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        {**_LLAMA_LIKE, "sliding_window": WINDOW, "attn_implementation": "sdpa"},
    ),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {
            **_LLAMA_LIKE,
            "head_dim": 8,
            "sliding_window": WINDOW,
            "final_logit_softcapping": 5.0,
            "attn_logit_softcapping": 20.0,
            "attn_implementation": "eager",
        },
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            **_LLAMA_LIKE,
            "head_dim": 8,
            "sliding_window": WINDOW,
            "final_logit_softcapping": 5.0,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    "granite": (
        "GraniteConfig",
        "GraniteForCausalLM",
        {**_LLAMA_LIKE, "logits_scaling": 4.0, "embedding_multiplier": 2.0, "residual_multiplier": 0.5},
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**_LLAMA_LIKE, "num_key_value_heads": HEADS}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS}),
    "gptj": (
        "GPTJConfig",
        "GPTJForCausalLM",
        {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "rotary_dim": 4},
    ),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {**_COMMON, "intermediate_size": 64}),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        {**_COMMON, "ffn_dim": 64, "word_embed_proj_dim": HIDDEN, "max_position_embeddings": 256},
    ),
    "opt_project_out": (
        "OPTConfig",
        "OPTForCausalLM",
        {**_COMMON, "ffn_dim": 64, "word_embed_proj_dim": 16, "max_position_embeddings": 256},
    ),
    "bloom": ("BloomConfig", "BloomForCausalLM", {"hidden_size": HIDDEN, "n_layer": LAYERS, "n_head": HEADS}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", _LLAMA_LIKE),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {
            **_LLAMA_LIKE,
            "head_dim": 8,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
        },
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {**_LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2},
    ),
}

# name -> (config class, config kwargs); their tokenizer is the WordPiece one for WORDPIECE, else micro.
ENCODERS: dict[str, tuple[str, dict[str, Any]]] = {
    "bert": ("BertConfig", {**_COMMON, "intermediate_size": 64, "type_vocab_size": 2}),
    "roberta": ("RobertaConfig", {**_COMMON, "intermediate_size": 64, "max_position_embeddings": 300}),
    "distilbert": (
        "DistilBertConfig",
        {"dim": HIDDEN, "n_layers": LAYERS, "n_heads": HEADS, "hidden_dim": 64},
    ),
    "deberta_v2": (
        "DebertaV2Config",
        {**_COMMON, "intermediate_size": 64, "type_vocab_size": 2, "relative_attention": True},
    ),
    "modernbert": (
        "ModernBertConfig",
        {**_COMMON, "intermediate_size": 64, "global_attn_every_n_layers": 2, "local_attention": 8},
    ),
    "electra": (
        "ElectraConfig",
        {**_COMMON, "intermediate_size": 64, "embedding_size": 16, "type_vocab_size": 2},
    ),
}


WORDPIECE = frozenset({"bert", "distilbert", "deberta_v2", "electra"})
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@functools.cache
def bert_tokenizer(vocab_size: int = 600) -> Any:
    """A small lower-casing WordPiece ``BertTokenizerFast`` trained on 300 built-in corpus records
    (prompts and answers): deterministic, ~1 s, nothing downloaded. Pairs get token types."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizerFast

    from heed.demo.corpus import make_corpus

    texts = [t for r in make_corpus(300, seed=0) for t in (r.prompt, r.response)]
    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=BERT_SPECIALS, show_progress=False
    )
    wp.train_from_iterator(texts, trainer=trainer)
    return BertTokenizerFast(vocab=wp.get_vocab())


def encoder_tokenizer(name: str) -> Any:
    """The tokenizer ``encoder_model_dir(name)`` saves: WordPiece for the BERT family, else micro."""
    return bert_tokenizer() if name in WORDPIECE else micro_tokenizer()


def micro_tokenizer() -> Any:
    """The built-in micro model's tokenizer (built once per machine and cached)."""
    from heed.demo.assets import MICRO, builtin_sft_model
    from heed.models.loading import load_tokenizer

    return load_tokenizer(builtin_sft_model(MICRO))


def causal_config(name: str, tokenizer: Any) -> Any:
    import transformers

    config_cls, _, kwargs = CAUSAL[name]
    kwargs = dict(kwargs)
    attn = kwargs.pop("attn_implementation", None)
    config = getattr(transformers, config_cls)(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        **kwargs,
    )
    if attn is not None:
        config._attn_implementation = attn
    return config


def build_causal(name: str, tokenizer: Any, seed: int = 0) -> Any:
    """A random-weight causal LM of architecture ``name`` (see ``CAUSAL``), in eval mode."""
    import torch
    import transformers

    config = causal_config(name, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, CAUSAL[name][1])(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def build_encoder(name: str, tokenizer: Any, seed: int = 0) -> Any:
    """A random-weight one-label ``*ForSequenceClassification`` encoder of architecture ``name``."""
    import torch
    import transformers

    config_cls, kwargs = ENCODERS[name]
    config = getattr(transformers, config_cls)(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, num_labels=1, **kwargs
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForSequenceClassification.from_config(config)
    return model.eval()


def _save(model: Any, tokenizer: Any, out: Path) -> Path:
    if not (out / "config.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
    return out


def causal_model_dir(name: str, root: str | Path) -> Path:
    """Save ``build_causal(name)`` with the micro tokenizer under ``root/name`` and return the folder."""
    tok = micro_tokenizer()
    return _save(build_causal(name, tok), tok, Path(root) / name)


def encoder_model_dir(name: str, root: str | Path) -> Path:
    """Save ``build_encoder(name)`` with ``encoder_tokenizer(name)`` under ``root/name`` and return the
    folder: what matters for these tests is that Heed feeds the encoder exactly what
    ``model(**tokenizer(prompt, response))`` feeds it, token types included."""
    tok = encoder_tokenizer(name)
    return _save(build_encoder(name, tok), tok, Path(root) / name)
