"""Reward models: a backbone plus a scalar head, stored as a plain Hugging Face
``AutoModelForSequenceClassification`` with ``num_labels=1``.

Decoder backbones (Llama-style) score at the last non-pad token, encoder backbones
(BERT-style) at the first token; both are exactly what ``transformers`` computes for such a
folder, because Heed scores with the model's own forward on right-padded batches. The text
scored for (prompt, response) is the chat rendering of the two as a user and an assistant
turn when the tokenizer has a chat template (``heed_chat`` in the saved config), else the
prompt followed by the response and EOS (decoders) or the tokenizer's text pair (encoders).

The folder also holds ``reward_stats.json`` (mean and std of the rewards on the eval set at
the end of training) so scores can be normalised: ``(r - mean) / std``.

The cheap variant (``freeze_backbone``) trains only the head on cached features of the
frozen backbone. ``head: linear`` is the model's own score layer; ``head: mlp`` is BERT's
pooler (dense + tanh) plus the classifier for encoders, and for decoders one extra decoder
block on top of the trunk whose attention output projection is zero, i.e. the residual
gated MLP ``h + W_down(silu(W_gate n(h)) * W_up n(h))`` before the final norm and score
layer, so the saved model stays a standard ``LlamaForSequenceClassification``.

An architecture whose ``transformers`` has no ``*ForSequenceClassification`` (Granite) gets
:func:`generic_reward_class`: the architecture's own base model plus a linear ``score`` layer read
at the last non-pad token (``transformers``' ``GenericForSequenceClassification``). Its folder holds
``modeling_heed_reward.py`` and an ``auto_map``, so plain ``transformers`` loads it with
``AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)``; Heed's own
loaders use the same class without running the folder's code. Which class a folder needs is decided
from ``config.json`` alone, before any weights load (:func:`reward_model_class`).

Encoders read a text pair with the token types their tokenizer gives (BERT: 0 for ``[CLS] prompt
[SEP]``, 1 for ``response [SEP]``), so a score equals ``model(**tokenizer(prompt, response))``.
"""

from __future__ import annotations

import functools
import inspect
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from heed.data.records import Prompt
from heed.data.templating import (
    as_messages,
    completion_suffix,
    has_chat_template,
    prepare_prompt,
    require_chat_template,
)
from heed.errors import ConfigError, HeedError, ModelLoadError

Backbone = Literal["decoder", "encoder"]
Head = Literal["linear", "mlp"]
STATS_FILE = "reward_stats.json"
GENERIC_CODE_FILE = "modeling_heed_reward.py"
ENCODER_TYPES = frozenset(
    {
        "bert",
        "roberta",
        "xlm-roberta",
        "distilbert",
        "deberta",
        "deberta-v2",
        "electra",
        "albert",
        "camembert",
        "mpnet",
        "modernbert",
        "ernie",
        "megatron-bert",
        "rembert",
    }
)


# ---------------------------------------------------------------- what a folder holds


def backbone_of(config: dict[str, Any] | Any) -> Backbone:
    """``encoder`` for BERT-style model types, else ``decoder``."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return "encoder" if model_type in ENCODER_TYPES else "decoder"


def is_reward_folder(config: dict[str, Any]) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def _num_labels(config: dict[str, Any]) -> int:
    if "num_labels" in config:
        return int(config["num_labels"])
    return len(config.get("id2label") or {0: "", 1: ""})


def read_stats(path: str | Path) -> dict[str, Any]:
    """The ``reward_stats.json`` beside a reward model ({} when absent)."""
    p = Path(path) / STATS_FILE
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{p}: unreadable ({exc.msg})") from None


# ---------------------------------------------------------------- which class holds a reward model


def _architecture(config: dict[str, Any]) -> str:
    return (config.get("architectures") or [config.get("model_type") or "?"])[0]


def reward_model_class(path: str | Path, config: dict[str, Any]) -> Any:
    """The class that builds (from a causal LM or encoder) or loads (a reward model) the one-label
    classifier for the folder ``path``, from its ``config.json`` alone: no weights are read.

    The architecture's ``*ForSequenceClassification`` when ``transformers`` has one (what
    ``AutoModelForSequenceClassification`` picks), else :func:`generic_reward_class` on its base model (decoders
    only: an encoder's classifier reads the first token). Anything else is a one-line
    :class:`ModelLoadError` naming the architecture and what is missing.
    """
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
        MODEL_MAPPING,
    )

    arch, model_type = _architecture(config), config.get("model_type")
    if not model_type:
        raise ModelLoadError(f"{path}/config.json: no model_type; cannot tell which architecture {arch} is")
    if model_type not in CONFIG_MAPPING:
        raise ModelLoadError(
            f"{path}: {arch} has model_type {model_type!r}, which transformers {transformers.__version__} "
            "does not know; Heed cannot build it (a newer transformers may)"
        )
    try:
        hf_config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"{path}/config.json: unreadable as {model_type} ({str(exc).splitlines()[0]})"
        ) from None
    if type(hf_config) in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        return MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(hf_config)]
    missing = f"transformers {transformers.__version__} has no sequence-classification class for {arch} ({model_type})"
    if backbone_of(config) == "encoder":
        raise ModelLoadError(f"{path}: {missing}; Heed cannot build an encoder reward model on it")
    base = MODEL_MAPPING.get(type(hf_config), None)
    if not isinstance(base, type) or _pretrained_parent(base) is None:
        raise ModelLoadError(
            f"{path}: {missing} and no base model class (AutoModel) to put a score head on; "
            "Heed cannot build a reward model on it"
        )
    if getattr(hf_config, "is_encoder_decoder", False):
        raise ModelLoadError(
            f"{path}: {missing}, and it is an encoder-decoder model; Heed's generic score head needs a decoder-only one"
        )
    if getattr(hf_config.get_text_config(), "hidden_size", None) is None:
        raise ModelLoadError(f"{path}: {missing}, and its config has no hidden_size for a score head")
    params = inspect.signature(base.forward).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()) and not set(params) >= _GENERIC_INPUTS:
        raise ModelLoadError(
            f"{path}: {missing}, and {base.__name__}.forward lacks "
            f"{', '.join(sorted(_GENERIC_INPUTS - set(params)))} that Heed's generic score head passes"
        )
    return generic_reward_class(type(hf_config))


# the arguments GenericForSequenceClassification passes to the base model
_GENERIC_INPUTS = frozenset(
    {"input_ids", "attention_mask", "position_ids", "cache", "inputs_embeds", "use_cache"}
)


def _pretrained_parent(base_model_class: type) -> type | None:
    """The architecture's ``*PreTrainedModel`` (weight init, attention settings) above its base model."""
    from transformers import PreTrainedModel

    return next(
        (
            c
            for c in base_model_class.__mro__[1:]
            if isinstance(c, type) and issubclass(c, PreTrainedModel) and c is not PreTrainedModel
        ),
        None,
    )


_GENERIC_CODE = '''"""{name}: a one-label sequence classifier (reward model) written by Heed, because
transformers {version} has none for this architecture: the {base} trunk and a linear `score` layer
read at the last non-pad token (transformers' GenericForSequenceClassification, as for Llama).

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
"""

from transformers.modeling_layers import GenericForSequenceClassification
from {module} import {pretrained}


class {name}(GenericForSequenceClassification, {pretrained}):
    base_model_prefix = {pretrained}.base_model_prefix
'''


@functools.cache
def generic_reward_class(config_class: type) -> type:
    """``<Arch>ForSequenceClassification`` for a decoder config class ``transformers`` has none for
    (e.g. ``GraniteConfig``), registered with ``AutoModelForSequenceClassification`` in this process.

    The base model (``AutoModel``) under the architecture's ``base_model_prefix``, so a causal LM's
    trunk weights load into it, and ``score``: Linear(H, num_labels, bias=False) applied at the
    rightmost non-pad token, i.e. exactly ``transformers``' ``GenericForSequenceClassification``.
    ``save_pretrained`` also writes ``modeling_heed_reward.py`` (the same class, importing only
    ``transformers``) and ``auto_map`` into ``config.json``, so the folder loads with plain
    ``transformers`` (``trust_remote_code=True``).
    """
    import transformers
    from transformers import AutoModelForSequenceClassification
    from transformers.modeling_layers import GenericForSequenceClassification
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    base_model_class = MODEL_MAPPING[config_class]
    pretrained = _pretrained_parent(base_model_class)
    assert pretrained is not None, base_model_class
    name = base_model_class.__name__.removesuffix("Model") + "ForSequenceClassification"
    code = _GENERIC_CODE.format(
        name=name,
        version=transformers.__version__,
        base=base_model_class.__name__,
        module=pretrained.__module__,
        pretrained=pretrained.__name__,
    )

    class Generic(GenericForSequenceClassification, pretrained):  # type: ignore[valid-type, misc]
        base_model_prefix = pretrained.base_model_prefix

        def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
            self.config.auto_map = {
                "AutoModelForSequenceClassification": f"{Path(GENERIC_CODE_FILE).stem}.{name}"
            }
            super().save_pretrained(save_directory, *args, **kwargs)
            (Path(save_directory) / GENERIC_CODE_FILE).write_text(code, encoding="utf-8")

    Generic.__name__ = Generic.__qualname__ = name
    # in this process the Auto class finds it without running the folder's copy of the code
    AutoModelForSequenceClassification.register(config_class, Generic, exist_ok=True)
    return Generic


# ---------------------------------------------------------------- building a reward model


def build_reward_model(
    path: str | Path,
    tokenizer_path: str | Path | None = None,
    head: Head = "linear",
    dtype: str = "float32",
    seed: int = 0,
) -> tuple[Any, Any, Backbone]:
    """A trainable reward model from a causal LM, an encoder, or an existing reward model folder.

    A causal LM's softmax layer is replaced by a new linear ``score`` layer (its trunk weights
    are kept); an encoder gets the classification head of its architecture. Returns
    ``(model, tokenizer, backbone)``; the model's config has ``num_labels=1`` and ``pad_token_id``
    set, so ``transformers`` finds the same scoring token as Heed. An architecture Heed cannot
    build on is a one-line error before any weights load (:func:`reward_model_class`).
    """
    from heed.models.loading import (
        LOAD_LOCK,
        load_tokenizer,
        quiet_transformers,
        read_model_config,
        torch_dtype,
    )

    quiet_transformers()
    config = read_model_config(path)
    model_class = reward_model_class(path, config)
    tok = load_tokenizer(tokenizer_path or path, padding_side="right")
    backbone = backbone_of(config)
    existing = is_reward_folder(config)
    if existing and _num_labels(config) != 1:
        raise ModelLoadError(
            f"{path}: a classifier with {_num_labels(config)} labels, not a reward model (need num_labels=1)"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the new head's initial weights depend on the seed only
        try:
            with LOAD_LOCK:
                model = model_class.from_pretrained(
                    str(path), num_labels=1, dtype=torch_dtype(dtype), local_files_only=True
                )
        except Exception as exc:
            raise ModelLoadError(
                f"{path}: cannot load as a reward model ({str(exc).splitlines()[0]})"
            ) from None
        model.config.pad_token_id = tok.pad_token_id
        model.config.problem_type = "regression"
        model.config.id2label = {0: "reward"}
        model.config.label2id = {"reward": 0}
        if head == "mlp" and backbone == "decoder" and getattr(model.config, "heed_head", "linear") != "mlp":
            model = _add_mlp_block(model, seed)
    if backbone == "encoder":  # BERT always has its pooler; `head` picks what a frozen backbone trains
        model.config.heed_head = head
    elif getattr(model.config, "heed_head", None) is None:
        model.config.heed_head = "linear"
    return model, tok, backbone


def _decoder_layers(model: Any) -> Any:
    body = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers = getattr(body, "layers", None)
    if layers is None or not len(layers) or not hasattr(layers[-1], "mlp") or not hasattr(body, "norm"):
        raise ConfigError(
            f"model.head: mlp on a decoder needs a Llama-style model (model.layers[*].mlp, model.norm); "
            f"{type(model).__name__} has none; use head: linear"
        )
    return body, layers


def _add_mlp_block(model: Any, seed: int) -> Any:
    """Append one decoder block whose attention output is zero: a residual gated-MLP head.

    The new block starts as the identity (``down_proj = 0``), so the model starts out scoring
    exactly like the linear head; its MLP then learns on top of the frozen trunk.
    """
    body, layers = _decoder_layers(model)
    attn_out = getattr(getattr(layers[-1], "self_attn", None), "o_proj", None)
    if attn_out is None or attn_out.bias is not None:
        raise ConfigError(
            "model.head: mlp on a decoder needs attention output projections without bias (self_attn.o_proj)"
        )
    config = model.config
    config.num_hidden_layers += 1
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [*config.layer_types, config.layer_types[-1]]
    config.heed_head = "mlp"
    torch.manual_seed(seed)
    bigger = type(model)._from_config(config, dtype=next(model.parameters()).dtype)
    missing, _ = bigger.load_state_dict(model.state_dict(), strict=False)
    _, new_layers = _decoder_layers(bigger)
    top = new_layers[-1]
    with torch.no_grad():
        top.self_attn.o_proj.weight.zero_()
        top.mlp.down_proj.weight.zero_()
        top.post_attention_layernorm.weight.copy_(body.norm.weight)
    prefix = f"{bigger.base_model_prefix}.layers.{config.num_hidden_layers - 1}."
    assert all(k.startswith(prefix) for k in missing), missing
    return bigger


# ---------------------------------------------------------------- the head on frozen features


class FrozenFeatures:
    """Train only the head of a reward model on features of its frozen backbone.

    ``features(ids, att)`` runs the whole model once and keeps the input of the head at the
    scoring position, shape (B, H); ``head(f)`` maps such features to rewards (B,) with the
    model's own head modules, so ``head(features(x)) == model(x).logits[:, 0]``.
    """

    def __init__(self, model: Any, backbone: Backbone) -> None:
        self.model = model
        self.backbone = backbone
        self.kind = getattr(model.config, "heed_head", "linear")
        if backbone == "decoder":
            body, layers = _decoder_layers(model) if self.kind == "mlp" else (None, None)
            if not hasattr(model, "score"):
                raise ConfigError(f"model.freeze_backbone: {type(model).__name__} has no `score` layer")
            self.modules = (
                [model.score]
                if self.kind != "mlp"
                else [layers[-1].mlp, layers[-1].post_attention_layernorm, body.norm, model.score]
            )
            self._hooked = model.score if self.kind != "mlp" else layers[-1]
        else:
            base = getattr(model, getattr(model, "base_model_prefix", ""), None)
            pooler = getattr(base, "pooler", None)
            classifier = getattr(model, "classifier", None)
            if pooler is None or not isinstance(classifier, torch.nn.Linear):
                raise ConfigError(
                    f"model.freeze_backbone: supported for BERT-style encoders (pooler + linear classifier); "
                    f"{type(model).__name__} is not one"
                )
            self.pooler, self.classifier = pooler, classifier
            self.modules = [classifier] if self.kind == "linear" else [pooler, classifier]
            self._hooked = classifier if self.kind == "linear" else pooler

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.modules for p in m.parameters()]

    def freeze(self) -> None:
        """requires_grad only on the head's parameters."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.parameters():
            p.requires_grad_(True)

    @torch.no_grad()
    def features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Head inputs at the scoring position, (B, H)."""
        captured: list[torch.Tensor] = []

        def grab(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            captured.append(args[0] if args else kwargs["hidden_states"])

        handle = self._hooked.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self.model(
                input_ids=input_ids, attention_mask=attention_mask, **_type_kwargs(self.model, token_type_ids)
            )
        finally:
            handle.remove()
        h = captured[0]
        if h.dim() == 2:  # the classifier's input is already pooled
            return h
        if self.backbone == "encoder":
            return h[:, 0]
        idx = last_token_index(input_ids, self.model.config.pad_token_id)
        return h[torch.arange(h.shape[0], device=h.device), idx]

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Rewards (B,) from features (B, H)."""
        f = features
        if self.backbone == "decoder":
            if self.kind == "mlp":
                mlp, mlp_norm, final_norm, score = self.modules
                # the extra block with zero attention output: h + MLP(n(h)), then the final norm and score
                return score(final_norm(f + mlp(mlp_norm(f))))[:, 0]
            return self.model.score(f)[:, 0]
        if self.kind != "linear":
            f = self.model.dropout(self.pooler.activation(self.pooler.dense(f)))
        return self.classifier(f)[:, 0]


def last_token_index(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """The rightmost non-pad position of each row, as ``transformers`` picks it. (B, T) -> (B,)."""
    if pad_token_id is None:
        return torch.full(
            (input_ids.shape[0],), input_ids.shape[1] - 1, dtype=torch.long, device=input_ids.device
        )
    not_pad = (input_ids != pad_token_id).long()
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions * not_pad).argmax(-1)


# ---------------------------------------------------------------- text -> tokens -> rewards


def use_chat_for(tokenizer: Any, chat: str | bool | None) -> bool:
    if chat is None or chat == "auto":
        return has_chat_template(tokenizer)
    return chat in (True, "true")


def encode_pair(
    tokenizer: Any, prompt: Prompt, response: str, chat: bool, backbone: Backbone, where: str = "prompt"
) -> tuple[list[int], list[int] | None]:
    """Token ids of one (prompt, response) as the reward model reads it (untruncated), and the
    token types the tokenizer gives an encoder (BERT's text pair: 0 for ``[CLS] prompt [SEP]``,
    1 for ``response [SEP]``); ``None`` for decoders and tokenizers without token types. The chat
    template is applied once: HH-RLHF markup becomes messages, an already rendered prompt stays."""
    special = backbone == "encoder"  # encoders keep their own [CLS] ... [SEP] convention
    prompt, form = prepare_prompt(tokenizer, prompt, chat, where)
    response = response.strip() if form == "hh" else response
    if form == "rendered":
        text = str(prompt) + response + completion_suffix(tokenizer, True)
        enc = tokenizer(text, add_special_tokens=special)
    elif chat or isinstance(prompt, list):
        require_chat_template(tokenizer, "prompt")
        text = tokenizer.apply_chat_template(
            [*as_messages(prompt), {"role": "assistant", "content": response}], tokenize=False
        )
        enc = tokenizer(text, add_special_tokens=special)
    elif backbone == "encoder":
        enc = tokenizer(prompt, response, add_special_tokens=True)
    else:
        enc = tokenizer(prompt + response + (tokenizer.eos_token or ""), add_special_tokens=False)
    types = enc.get("token_type_ids") if backbone == "encoder" else None
    return list(enc["input_ids"]), (list(types) if types is not None else None)


def truncate_ids(seqs: list[list[int]], max_length: int) -> tuple[list[list[int]], int]:
    """Keep the first ``max_length`` tokens of each sequence; returns them and how many were cut."""
    cut = sum(len(s) > max_length for s in seqs)
    return [s[:max_length] for s in seqs], cut


def pad_right(
    seqs: Sequence[list[int]], pad_id: int, device: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` (B, T). Right padding keeps the
    default position ids of ``transformers`` correct, so scores match a plain HF forward."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        att[i, : len(s)] = 1
    return ids.to(device), att.to(device)


def pad_types(types: Sequence[list[int]] | None, device: Any = None) -> torch.Tensor | None:
    """Right-padded ``token_type_ids`` (B, T) (0 on padding, as BERT's tokenizer pads), or None."""
    if types is None:
        return None
    out = torch.zeros((len(types), max(len(t) for t in types)), dtype=torch.long)
    for i, t in enumerate(types):
        out[i, : len(t)] = torch.tensor(t, dtype=torch.long)
    return out.to(device)


def _type_kwargs(model: Any, token_type_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``{"token_type_ids": ...}`` when given and the model's forward takes them (BERT, ELECTRA,
    DeBERTa); DistilBERT, RoBERTa-style and decoder forwards have no such argument."""
    from heed.models.lora import base_of

    if token_type_ids is None or "token_type_ids" not in inspect.signature(base_of(model).forward).parameters:
        return {}
    return {"token_type_ids": token_type_ids}


_MASK_FREE_KEY = "_heed_mask_free"


def mask_free(model: Any) -> bool:
    """Whether right-padded rows can run without their padding mask: a causal decoder's real tokens
    attend only to the tokens before them, never to the padding after them, so dropping the mask changes
    no score, and lets attention run its causal kernel (no (B, H, T, T) mask or probabilities kept for
    the backward on a CPU). Encoders never; a decoder must show it once (cached on the model): a
    right-padded probe batch scores the same with and without the mask (relative error within
    :func:`heed.models.lm._tolerance`, as the other probes)."""
    from heed.models.lm import unwrap

    base = unwrap(model)
    if _MASK_FREE_KEY not in base.__dict__:
        base.__dict__[_MASK_FREE_KEY] = backbone_of(base.config) == "decoder" and _probe_mask_free(base)
    return base.__dict__[_MASK_FREE_KEY]


@torch.no_grad()
def _probe_mask_free(model: Any) -> bool:
    from heed.models.lm import _tolerance

    pad = model.config.pad_token_id
    if pad is None:
        return False
    vocab = model.get_input_embeddings().weight.shape[0]
    device = model.get_input_embeddings().weight.device
    real = [t for t in range(3, 12) if t != pad][:6]
    ids, att = pad_right([real, real[:3], real[2:5]], pad, device)
    ids = ids % vocab
    was_training = model.training
    model.eval()  # no dropout in the probe
    try:
        masked = forward_rewards(model, ids, att, unmasked=False)
        free = forward_rewards(model, ids, att, unmasked=True)
    except Exception:
        return False
    finally:
        model.train(was_training)
    return float(((masked - free).abs() / masked.abs().clamp_min(1.0)).max()) <= _tolerance(model.dtype)


def forward_rewards(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
    unmasked: bool | None = None,
) -> torch.Tensor:
    """Rewards (B,) in float32 from the model's own forward (B, T) -> (B, 1) over right-padded rows.

    ``unmasked``: run without the padding mask (None: where :func:`mask_free` says it gives the same
    scores)."""
    config = getattr(model, "module", model).config  # under DDP the forward goes through the wrapper
    extra = (
        {"use_cache": False} if getattr(config, "use_cache", None) is not None else {}
    )  # no KV cache to build
    extra.update(_type_kwargs(model, token_type_ids))
    from heed.models.lm import is_right_padded

    if unmasked is None:  # rows right-padded (ones, then zeros), a model that scores them alike without
        unmasked = token_type_ids is None and is_right_padded(attention_mask) and mask_free(model)
    mask = None if unmasked else attention_mask
    return model(input_ids=input_ids, attention_mask=mask, **extra).logits[:, 0].float()


@dataclass
class RewardModel:
    """A loaded reward model: ``score(prompts, responses)`` and the reward-function contract
    ``rm(prompts, completions, **columns) -> list[float]``."""

    model: Any
    tokenizer: Any
    backbone: Backbone = "decoder"
    chat: bool = True
    max_length: int = 512
    mean: float | None = None
    std: float | None = None
    path: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> RewardModel:
        self.model.to(device)
        return self

    def tokenize(
        self, prompts: Sequence[Prompt], responses: Sequence[str]
    ) -> tuple[list[list[int]], list[list[int]] | None, int]:
        """Token ids of each pair and their token types (None without), truncated to ``max_length``,
        and the number truncated."""
        if len(prompts) != len(responses):
            raise HeedError(
                f"score: {len(prompts)} prompts but {len(responses)} responses (need one prompt per response)"
            )
        pairs = [
            encode_pair(self.tokenizer, p, r, self.chat, self.backbone)
            for p, r in zip(prompts, responses, strict=True)
        ]
        seqs, cut = truncate_ids([ids for ids, _ in pairs], self.max_length)
        types = [t for _, t in pairs]
        if any(t is None for t in types):
            return seqs, None, cut
        return seqs, truncate_ids(types, self.max_length)[0], cut  # type: ignore[arg-type]

    def encode(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> tuple[list[list[int]], int]:
        """Token ids of each pair, truncated to ``max_length``, and the number truncated."""
        seqs, _, cut = self.tokenize(prompts, responses)
        return seqs, cut

    def normalize(self, rewards: Sequence[float]) -> list[float]:
        """``(r − mean) / std`` with the statistics saved at the end of training."""
        if self.mean is None or self.std is None:
            raise HeedError(
                f"{self.path or 'reward model'}: no {STATS_FILE} with mean/std; cannot normalise scores"
            )
        std = self.std if self.std > 0 else 1.0
        return [(r - self.mean) / std for r in rewards]

    @torch.inference_mode()
    def score(
        self,
        prompts: Sequence[Prompt],
        responses: Sequence[str],
        batch_size: int = 32,
        normalize: bool = False,
        progress: Any = None,
    ) -> list[float]:
        """One scalar per (prompt, response), batched longest-first (less padding), in input order.

        ``progress``, if given, is called with the number of pairs done after each batch.
        """
        seqs, types, cut = self.tokenize(prompts, responses)
        if cut:
            warnings.warn(
                f"{cut} of {len(seqs)} responses were longer than max_length={self.max_length} "
                "tokens and were truncated before scoring",
                stacklevel=2,
            )
        was_training = self.model.training
        self.model.eval()
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        out = [0.0] * len(seqs)
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, att = pad_right([seqs[i] for i in idx], pad, self.device)
            tt = pad_types([types[i] for i in idx] if types is not None else None, self.device)
            for i, r in zip(idx, forward_rewards(self.model, ids, att, tt).tolist(), strict=True):
                out[i] = r
            if progress is not None:
                progress(len(idx))
        self.model.train(was_training)
        return self.normalize(out) if normalize else out

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str], **columns: Any) -> list[float]:
        return self.score(prompts, completions)


def reward_model_from(model: Any, tokenizer: Any, path: str | Path | None = None) -> RewardModel:
    """Wrap a loaded ``*ForSequenceClassification`` model with the rendering settings it was trained with."""
    config = model.config
    backbone = getattr(config, "heed_backbone", None) or backbone_of(config)
    chat = use_chat_for(tokenizer, getattr(config, "heed_chat", None))
    limits = [getattr(config, "heed_max_length", None), getattr(config, "max_position_embeddings", None)]
    max_length = (
        min(v for v in limits if isinstance(v, int) and v > 0)
        if any(isinstance(v, int) and v > 0 for v in limits)
        else 512
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    stats = read_stats(path) if path is not None else {}
    return RewardModel(
        model,
        tokenizer,
        backbone,
        chat,
        max_length,
        stats.get("mean"),
        stats.get("std"),
        str(path) if path is not None else None,
    )


def load_reward_model(path: str | Path, device: str | None = None, dtype: str = "float32") -> RewardModel:
    """Load a reward model folder (``heed rm train``'s ``final/``, or any one-label
    ``AutoModelForSequenceClassification``) for scoring."""
    from heed.models.loading import (
        LOAD_LOCK,
        load_tokenizer,
        quiet_transformers,
        read_model_config,
        torch_dtype,
    )

    quiet_transformers()
    config = read_model_config(path)
    if not is_reward_folder(config):
        archs = ", ".join(config.get("architectures") or ["no architecture"])
        raise ModelLoadError(
            f"{path}: holds {archs}, not a reward model (no classification head); "
            f"train one with `heed rm train --set model.path={path}`"
        )
    if _num_labels(config) != 1:
        raise ModelLoadError(
            f"{path}: a classifier with {_num_labels(config)} labels, not a reward model (need num_labels=1)"
        )
    model_class = reward_model_class(path, config)
    tok = load_tokenizer(path, padding_side="right")
    try:
        with LOAD_LOCK:
            model = model_class.from_pretrained(str(path), dtype=torch_dtype(dtype), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot load the reward model ({str(exc).splitlines()[0]})") from None
    model.eval()
    if device is not None:
        model.to(device)
    return reward_model_from(model, tok, path)


def score(model: Any, tokenizer: Any, prompt: Prompt, response: str) -> float:
    """Score one (prompt, response) with a loaded reward model (a :class:`RewardModel`, or a
    ``*ForSequenceClassification`` model and its tokenizer)."""
    rm = model if isinstance(model, RewardModel) else reward_model_from(model, tokenizer)
    return rm.score([prompt], [response])[0]


def new_reward_model(
    tokenizer: Any, backbone: Backbone, size: str = "tiny", max_position_embeddings: int = 512, seed: int = 0
) -> Any:
    """A randomly initialised built-in reward model (Llama-style decoder or BERT-style encoder)."""
    from transformers import AutoModelForSequenceClassification

    from heed.models.tiny import tiny_encoder_config, tiny_llama_config

    if backbone == "encoder":
        config = tiny_encoder_config(tokenizer, size=size, num_labels=1)
    else:
        config = tiny_llama_config(tokenizer, size=size, max_position_embeddings=max_position_embeddings)
        config.num_labels = 1
    config.problem_type = "regression"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForSequenceClassification.from_config(config)


# ---------------------------------------------------------------- a group's shared prompt run once

_SHARED_KEY = "_heed_shared_prefix_support"


def _plain_last_index(seq: Sequence[int], pad_id: int | None) -> int:
    """Where ``transformers`` reads a right-padded sequence's score: its rightmost non-pad token
    (0 when every token is the pad id, the last one without a pad id), as :func:`last_token_index`."""
    if pad_id is None:
        return len(seq) - 1
    return max((i for i, t in enumerate(seq) if t != pad_id), default=0)


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the tokens every sequence starts with, leaving each at least one token of its own."""
    n = min(len(s) for s in seqs) - 1
    for i in range(max(n, 0)):
        t = seqs[0][i]
        if any(s[i] != t for s in seqs[1:]):
            return i
    return max(n, 0)


def _shared_prefix_scores(model: Any, groups: Sequence[Sequence[Sequence[int]]], device: Any) -> torch.Tensor:
    """Rewards (N,) of every sequence of ``groups`` from one forward over G packed rows.

    Group g becomes ``[prefix (n_g) | rest of seq 1 | ... | rest of seq K]`` (right-padded to the
    longest row): the tokens the K sequences share (the prompt) run once. Token t of sequence j's
    rest sits at position n_g + t, as in the sequence alone; the (G, 1, L, L) block mask lets it see
    the prefix and its own earlier tokens only (:func:`heed.models.lm.shared_prefix_mask`). Each score is the
    ``score`` layer on the hidden state of the sequence's own scoring token (rightmost non-pad)."""
    from heed.models.lm import shared_prefix_mask, trunk

    pad_id = model.config.pad_token_id
    rows, segs, poss, picks = [], [], [], []  # picks: (row, column) of each sequence's scoring token
    for g, seqs in enumerate(groups):
        n = _common_prefix(seqs)
        row, seg, pos = list(seqs[0][:n]), [0] * n, list(range(n))
        for j, s in enumerate(seqs):
            start = len(row)
            row += s[n:]
            seg += [j + 1] * (len(s) - n)
            pos += range(n, len(s))
            i = _plain_last_index(s, pad_id)
            picks.append((g, i if i < n else start + i - n))
        rows.append(row)
        segs.append(seg)
        poss.append(pos)
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    seg = torch.full((len(rows), width), -1, dtype=torch.long)  # -1 padding, 0 prefix, j + 1 sequence j
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for g, (r, s, p) in enumerate(zip(rows, segs, poss, strict=True)):
        ids[g, : len(r)] = torch.tensor(r, dtype=torch.long)
        seg[g, : len(s)] = torch.tensor(s, dtype=torch.long)
        pos[g, : len(p)] = torch.tensor(p, dtype=torch.long)
    ids, seg, pos = ids.to(device), seg.to(device), pos.to(device)
    out = trunk(model)(
        input_ids=ids, attention_mask=shared_prefix_mask(model, seg, pos), position_ids=pos, use_cache=False
    )
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (G, L, H)
    r_idx = torch.tensor([g for g, _ in picks], device=device)
    c_idx = torch.tensor([c for _, c in picks], device=device)
    return model.score(hidden[r_idx, c_idx])[:, 0].float()  # (N,)


def can_share_prefix(model: Any) -> bool:
    """Whether :func:`shared_prefix_rewards` gives this reward model's own scores: a decoder with a
    ``score`` layer, called directly (not under a data-parallel wrapper), whose packed forward
    matches its padded one on a probe (two sequences with a common prefix; probed once per model,
    cached on it, said once in the log when not). Not so for ALiBi models (Bloom builds its biases
    from a 2-D mask) or a score head that is not a plain layer on the trunk's output."""
    from heed.models.lm import _first_line, _tolerance, _wrapped, say_once

    if _wrapped(model) or not hasattr(model, "score") or backbone_of(model.config) != "decoder":
        return False
    cached = model.__dict__.get(_SHARED_KEY)
    if cached is not None:
        return bool(cached)
    emb = model.get_input_embeddings().weight
    pad = model.config.pad_token_id
    vocab = emb.shape[0]
    gen = torch.Generator().manual_seed(0)
    tokens = [t for t in torch.randint(0, vocab, (40,), generator=gen).tolist() if t != pad]
    seqs = [tokens[:17], tokens[:9] + tokens[20:31]]  # a 9-token prefix, then 8 and 11 tokens apart
    was = model.training
    model.eval()
    why = None
    try:
        with torch.no_grad(), torch.autocast(device_type=emb.device.type, enabled=False):
            plain = torch.stack(
                [
                    forward_rewards(
                        model,
                        torch.tensor([s], device=emb.device),
                        torch.ones(1, len(s), dtype=torch.long, device=emb.device),
                    )[0]
                    for s in seqs
                ]
            )
            shared = _shared_prefix_scores(model, [seqs], emb.device)
        err = float((shared - plain).norm() / plain.norm().clamp_min(1e-6))
        if err > _tolerance(emb.dtype):
            why = f"a block attention mask does not give its scores (relative error {err:.1e})"
    except Exception as exc:
        why = f"its trunk does not take a block attention mask ({_first_line(exc)})"
    finally:
        model.train(was)
    model.__dict__[_SHARED_KEY] = why is None
    if why:
        say_once(f"{type(model).__name__}: {why}; the responses of a group run as padded rows")
    return why is None


def shared_prefix_rewards(
    model: Any, groups: Sequence[Sequence[Sequence[int]]], pad_id: int, device: Any
) -> torch.Tensor:
    """Rewards (N,) of the sequences of ``groups`` (in order), each group's common prefix (its
    prompt) run once: :func:`_shared_prefix_scores` where :func:`can_share_prefix` says it is exact,
    else one right-padded forward of all N sequences (:func:`forward_rewards`)."""
    if can_share_prefix(model):
        return _shared_prefix_scores(model, groups, device)
    ids, att = pad_right([s for g in groups for s in g], pad_id, device)
    return forward_rewards(model, ids, att)
