"""Reward-model figures on the built-in world, where the hidden preference is known.

Ranked groups (K=4, noise-free) come from ``heed.demo.preferences.make_ranked_groups``; the
eval groups use held-out prompts (``heldout=True``: prompt templates / topics never trained
on). Two backbones:

- decoder: the built-in tiny SFT model, fully fine-tuned with its new score head;
- encoder: a BERT of the same size built from ``tiny_encoder_config`` with the built-in
  tokenizer, pretrained for ``--mlm-seconds`` by masked language modelling on the corpus
  text (``<|unk|>`` stands in as the mask token), then trained as a reward model.

It also checks that the saved decoder model, reloaded with plain
``AutoModelForSequenceClassification``, scores within 1e-5 of ``heed rm score``.

    python benchmarks/rm_accuracy.py --threads 2 --out runs/rm-figures
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import torch


def pretrain_encoder(
    tokenizer: Any, texts: list[str], out: Path, seconds: float, size: str, seed: int
) -> dict[str, Any]:
    """A BERT masked-LM trained for ``seconds`` on ``texts``; saved to ``out``."""
    from transformers import BertForMaskedLM

    from heed.models.loading import save_pretrained
    from heed.models.reward import pad_right
    from heed.models.tiny import tiny_encoder_config

    torch.manual_seed(seed)
    model = BertForMaskedLM(tiny_encoder_config(tokenizer, size=size))
    mask_id = tokenizer.unk_token_id
    special = set(tokenizer.all_special_ids)
    docs = [tokenizer(t, add_special_tokens=False)["input_ids"][:128] for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    rng = random.Random(seed)
    model.train()
    t0, steps, loss_value = time.time(), 0, float("nan")
    while time.time() - t0 < seconds:
        batch = rng.sample(docs, 64)
        ids, att = pad_right(batch, tokenizer.pad_token_id)
        can = att.bool() & ~torch.isin(ids, torch.tensor(sorted(special)))
        chosen = can & (torch.rand(ids.shape) < 0.15)  # BERT's 15%: 80% [MASK], 10% random, 10% kept
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        u = torch.rand(ids.shape)
        inputs = torch.where(chosen & (u < 0.8), torch.full_like(ids, mask_id), ids)
        inputs = torch.where(chosen & (u >= 0.8) & (u < 0.9), torch.randint_like(ids, len(tokenizer)), inputs)
        lr = 1e-3 * min(1.0, (steps + 1) / 50)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = model(input_ids=inputs, attention_mask=att, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
        loss_value = loss.item()
    save_pretrained(model, tokenizer, out)
    return {"mlm_steps": steps, "mlm_seconds": time.time() - t0, "mlm_final_loss": loss_value}


def train_rm(
    model_path: Path, train: Path, eval_: Path, out: Path, args: argparse.Namespace, **model_cfg: Any
) -> dict:
    from heed.config import config_from_dict
    from heed.config.reward import RMConfig
    from heed.train.reward import train_reward

    cfg = config_from_dict(
        RMConfig,
        {
            "model": {"path": str(model_path), **model_cfg},
            "data": {"train": str(train), "eval": str(eval_), "max_length": 128},
            "train": {"batch_size": args.batch_size, "epochs": args.epochs, "seed": args.seed},
            "optim": {"lr": args.lr, "warmup_steps": 5},
            "log": {"progress": False, "log_every": 5},
            "out": str(out),
            "overwrite": True,
        },
    )
    t0 = time.time()
    summary = train_reward(cfg)
    summary["wall_seconds_incl_load"] = time.time() - t0
    return summary


def parity(final: Path, groups: list[dict[str, Any]]) -> float:
    """Max |heed score − plain transformers score| over some held-out responses (each scored alone in HF)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from heed.models.reward import load_reward_model

    prompts = [g["prompt"] for g in groups for _ in g["responses"]]
    responses = [r for g in groups for r in g["responses"]]
    ours = load_reward_model(final).score(prompts, responses, batch_size=16)
    hf = AutoModelForSequenceClassification.from_pretrained(str(final)).eval()
    tok = AutoTokenizer.from_pretrained(str(final))
    worst = 0.0
    for p, r, s in zip(prompts, responses, ours, strict=True):
        text = tok.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
        )
        with torch.no_grad():
            plain = hf(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
        worst = max(worst, abs(plain - s))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/rm-figures")
    ap.add_argument("--model", default=None, help="decoder backbone (default: the built-in tiny SFT model)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the figure is for 2 cores)")
    ap.add_argument("--groups", type=int, default=800, help="training groups")
    ap.add_argument("--eval-groups", type=int, default=200)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--encoder-lr", type=float, default=3e-4)
    ap.add_argument("--mlm-seconds", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["decoder", "encoder", "both"], default="both")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from heed.data.io import write_jsonl
    from heed.demo.assets import builtin_sft_model
    from heed.demo.preferences import make_ranked_groups
    from heed.models.loading import load_tokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_groups = make_ranked_groups(args.groups, k=args.k, seed=args.seed, heldout=False, noise=0.0)
    eval_groups = make_ranked_groups(args.eval_groups, k=args.k, seed=args.seed + 1, heldout=True, noise=0.0)
    write_jsonl(out / "train.jsonl", train_groups)
    write_jsonl(out / "eval.jsonl", eval_groups)
    sft = Path(args.model) if args.model else builtin_sft_model()
    results: dict[str, Any] = {
        "load_avg_start": os.getloadavg(),
        "threads": args.threads,
        "k": args.k,
        "train_groups": args.groups,
        "eval_groups": args.eval_groups,
    }
    keys = (
        "rm/accuracy",
        "rm/top1_accuracy",
        "rm/kendall_tau",
        "rm/eval_loss",
        "train_seconds",
        "train_cpu_seconds",
        "wall_seconds_incl_load",
    )
    if args.only in ("decoder", "both"):
        s = train_rm(sft, out / "train.jsonl", out / "eval.jsonl", out / "decoder", args)
        results["decoder"] = {k: s[k] for k in keys}
        results["decoder"]["max_abs_diff_vs_transformers"] = parity(
            out / "decoder" / "final", eval_groups[:25]
        )
        print("decoder", json.dumps(results["decoder"]), flush=True)
    if args.only in ("encoder", "both"):
        tok = load_tokenizer(sft)
        text_file = sft.parent.parent / "data" / "text.jsonl"  # the corpus the built-in model was trained on
        texts = [json.loads(line)["text"] for line in text_file.read_text().splitlines()]
        mlm = pretrain_encoder(tok, texts, out / "encoder-mlm", args.mlm_seconds, "tiny", args.seed)
        enc_args = argparse.Namespace(**{**vars(args), "lr": args.encoder_lr})
        s = train_rm(out / "encoder-mlm", out / "train.jsonl", out / "eval.jsonl", out / "encoder", enc_args)
        results["encoder"] = {**mlm, **{k: s[k] for k in keys}}
        print("encoder", json.dumps(results["encoder"]), flush=True)
    results["load_avg_end"] = os.getloadavg()
    (out / "figures.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
