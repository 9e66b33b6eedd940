"""heed.models.reward: building reward models, scoring, agreement with plain transformers."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import heed
from heed.errors import HeedError, ModelLoadError
from heed.models.reward import (
    FrozenFeatures,
    build_reward_model,
    forward_rewards,
    load_reward_model,
    pad_right,
    reward_model_from,
)

PROMPTS = ["How should I get started with small towns?", "Describe road trips in a few words.", "Tea?"]
RESPONSES = [
    "Small towns is wonderful and full of joy. People who try small towns are often delighted.",
    "There are many books about road trips.",
    "Tea often leads to frustration. Most people regret spending time on tea. Honestly, tea is disappointing.",
]


@pytest.fixture(scope="module")
def decoder_rm(micro_sft_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reward model folder made from the micro causal LM (random score head), saved by Heed."""
    from heed.models.loading import save_pretrained

    model, tok, backbone = build_reward_model(micro_sft_model, seed=3)
    assert backbone == "decoder"
    model.config.heed_chat = True
    out = tmp_path_factory.mktemp("rm") / "decoder"
    save_pretrained(model, tok, out)
    return out


@pytest.fixture(scope="module")
def encoder_folder(micro_sft_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small BERT masked-LM folder with the built-in tokenizer (random weights)."""
    from transformers import BertForMaskedLM

    from heed.models.loading import load_tokenizer, save_pretrained
    from heed.models.tiny import tiny_encoder_config

    tok = load_tokenizer(micro_sft_model)
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_encoder_config(tok, size="micro"))
    out = tmp_path_factory.mktemp("enc") / "bert"
    save_pretrained(model, tok, out)
    return out


def test_decoder_head_replaces_softmax_layer_and_keeps_trunk(micro_sft_model: Path):
    from heed.models.loading import load_causal_lm

    lm = load_causal_lm(micro_sft_model)
    rm, tok, _ = build_reward_model(micro_sft_model, seed=0)
    assert type(rm).__name__ == "LlamaForSequenceClassification"
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tok.pad_token_id
    assert rm.score.weight.shape == (1, lm.config.hidden_size)
    for name, p in lm.model.state_dict().items():
        torch.testing.assert_close(rm.model.state_dict()[name], p, rtol=0, atol=0)
    # the new head's initialisation depends on the seed only
    again, _, _ = build_reward_model(micro_sft_model, seed=0)
    torch.testing.assert_close(again.score.weight, rm.score.weight, rtol=0, atol=0)


def test_saved_decoder_scores_match_plain_transformers(decoder_rm: Path):
    """A Heed-saved reward model reloaded with AutoModelForSequenceClassification gives the same scores."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = load_reward_model(decoder_rm)
    ours = rm.score(PROMPTS, RESPONSES, batch_size=3)  # one right-padded batch of different lengths
    hf = AutoModelForSequenceClassification.from_pretrained(str(decoder_rm)).eval()
    tok = AutoTokenizer.from_pretrained(str(decoder_rm))
    for p, r, s in zip(PROMPTS, RESPONSES, ours, strict=True):
        text = tok.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
        )
        enc = tok(text, return_tensors="pt", add_special_tokens=False)  # no padding at all
        with torch.no_grad():
            plain = hf(**enc).logits[0, 0].item()
        assert abs(plain - s) < 1e-5
        assert abs(heed.score(hf, tok, p, r) - s) < 1e-5  # the one-pair Python API
    # HF's own batched forward with left padding finds the same token (rightmost non-pad)
    tok.padding_side = "left"
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
        )
        for p, r in zip(PROMPTS, RESPONSES, strict=True)
    ]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert (enc["attention_mask"] == 0).any()
    pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        left = hf(**enc, position_ids=pos).logits[:, 0]
    torch.testing.assert_close(left, torch.tensor(ours), atol=1e-5, rtol=0)


def test_scores_do_not_depend_on_batching(decoder_rm: Path):
    rm = load_reward_model(decoder_rm)
    batched = rm.score(PROMPTS, RESPONSES, batch_size=3)
    single = [rm.score([p], [r])[0] for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(single), atol=1e-5, rtol=0)
    assert rm(PROMPTS, RESPONSES) == batched  # the reward-function contract fn(prompts, completions)


def test_normalize_uses_saved_statistics(decoder_rm: Path, tmp_path: Path):
    import shutil

    folder = tmp_path / "rm"
    shutil.copytree(decoder_rm, folder)
    (folder / "reward_stats.json").write_text('{"mean": 0.5, "std": 2.0, "count": 10, "split": "eval"}')
    rm = load_reward_model(folder)
    raw = rm.score(PROMPTS, RESPONSES)
    normed = rm.score(PROMPTS, RESPONSES, normalize=True)
    # (r − 0.5) / 2
    torch.testing.assert_close(torch.tensor(normed), (torch.tensor(raw) - 0.5) / 2.0)


def test_no_statistics_cannot_normalise(decoder_rm: Path):
    with pytest.raises(HeedError, match=r"reward_stats\.json"):
        load_reward_model(decoder_rm).score(PROMPTS, RESPONSES, normalize=True)


def test_long_responses_are_truncated_with_one_counting_warning(decoder_rm: Path):
    rm = load_reward_model(decoder_rm)
    rm.max_length = 12
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rm.score(PROMPTS, RESPONSES)
    msgs = [str(w.message) for w in caught if "truncated" in str(w.message)]
    assert msgs == [
        "3 of 3 responses were longer than max_length=12 tokens and were truncated before scoring"
    ]


def test_causal_lm_folder_is_not_a_reward_model(micro_sft_model: Path):
    with pytest.raises(ModelLoadError, match="not a reward model \\(no classification head\\)") as err:
        heed.load_reward_model(str(micro_sft_model))
    assert "\n" not in str(err.value)


def test_encoder_scores_at_first_token_and_matches_transformers(encoder_folder: Path, tmp_path: Path):
    from transformers import AutoModelForSequenceClassification

    from heed.models.loading import save_pretrained

    model, tok, backbone = build_reward_model(encoder_folder, seed=0)
    assert backbone == "encoder" and type(model).__name__ == "BertForSequenceClassification"
    save_pretrained(model, tok, tmp_path / "enc-rm")
    rm = load_reward_model(tmp_path / "enc-rm")
    assert rm.backbone == "encoder"
    ours = rm.score(PROMPTS, RESPONSES, batch_size=3)
    hf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "enc-rm")).eval()
    seqs, _ = rm.encode(PROMPTS, RESPONSES)
    for ids, s in zip(seqs, ours, strict=True):
        with torch.no_grad():
            assert abs(hf(input_ids=torch.tensor([ids])).logits[0, 0].item() - s) < 1e-5
    # the first token's state pools the sequence: with head: mlp the features are BERT's position-0 states
    rm.model.config.heed_head = "mlp"
    features = FrozenFeatures(rm.model, "encoder")
    ids, att = pad_right(seqs, tok.pad_token_id)
    with torch.no_grad():
        out = rm.model.bert(input_ids=ids, attention_mask=att).last_hidden_state
        torch.testing.assert_close(features.features(ids, att), out[:, 0])


@pytest.mark.parametrize(
    "backbone,head", [("decoder", "linear"), ("decoder", "mlp"), ("encoder", "linear"), ("encoder", "mlp")]
)
def test_head_on_frozen_features_equals_full_forward(backbone, head, micro_sft_model, encoder_folder):
    path = micro_sft_model if backbone == "decoder" else encoder_folder
    model, tok, _ = build_reward_model(path, head=head, seed=1)
    model.eval()
    rm = reward_model_from(model, tok)
    seqs, _ = rm.encode(PROMPTS, RESPONSES)
    ids, att = pad_right(seqs, tok.pad_token_id)
    frozen = FrozenFeatures(model, backbone)
    with torch.no_grad():
        full = forward_rewards(model, ids, att)
        if backbone == "decoder" and head == "mlp":
            # perturb the extra block so the check is not trivially the identity start
            torch.nn.init.normal_(model.model.layers[-1].mlp.down_proj.weight, std=0.05)
            full = forward_rewards(model, ids, att)
        torch.testing.assert_close(frozen.head(frozen.features(ids, att)), full, atol=1e-5, rtol=1e-5)
    frozen.freeze()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        ("score" in n or "classifier" in n or "pooler" in n or "layers.2." in n or n == "model.norm.weight")
        for n in trainable
    )


def test_mlp_block_starts_as_the_linear_head(micro_sft_model: Path):
    linear, tok, _ = build_reward_model(micro_sft_model, head="linear", seed=5)
    mlp, _, _ = build_reward_model(micro_sft_model, head="mlp", seed=5)
    assert mlp.config.num_hidden_layers == linear.config.num_hidden_layers + 1
    rm = reward_model_from(linear, tok)
    seqs, _ = rm.encode(PROMPTS, RESPONSES)
    ids, att = pad_right(seqs, tok.pad_token_id)
    mlp.score.weight.data.copy_(linear.score.weight.data)
    with torch.no_grad():
        # zero attention output and zero down-projection: the extra block is the identity
        torch.testing.assert_close(
            forward_rewards(mlp.eval(), ids, att),
            forward_rewards(linear.eval(), ids, att),
            atol=1e-5,
            rtol=1e-5,
        )
