"""vLLM as the rollout engine (``rollout.engine: vllm``; GPU only, ``pip install 'heed[vllm]'``).

Colocated: each training process holds one vLLM ``LLM`` on its own GPU, beside the policy.
Before every call the policy's current weights are pushed into vLLM (a LoRA policy is merged
for the push and unmerged after, so vLLM always serves plain weights); with sleep mode vLLM
frees its weights and KV cache between calls (``sleep(level=2)``), so training gets the memory
back. vLLM returns the log-prob of each sampled token after temperature
(``logprobs_mode="processed_logprobs"``); the trainer still recomputes the behaviour log-probs
with its own forward and logs the mean difference as ``rollout/logprob_diff``.

Each prompt's request gets a seed derived from its answers' keys, so a rank generating its share
of prompts gets the answers it would get in a one-process run on the same GPU type.

Written against vLLM's offline ``LLM`` API as used by colocated trainers (``sleep`` /
``wake_up(tags=...)``, ``model_runner.model.load_weights``, ``reset_prefix_cache``).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from typing import Any

import torch

from heed.errors import ConfigError
from heed.rollout.generate import Generation, SamplingParams, build_generation, stop_ids


def check_vllm() -> None:
    """One-line errors naming the fix when vLLM cannot run here (no CUDA GPU, extra not installed)."""
    if not torch.cuda.is_available():
        raise ConfigError(
            "rollout.engine: vllm needs a CUDA GPU and none is visible; use rollout.engine: heed (or hf)"
        )
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "rollout.engine: vllm is not installed; install the GPU extra (pip install 'heed[vllm]') "
            "or use rollout.engine: heed"
        )


def policy_weights(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the policy's weights under Hugging Face checkpoint names, what vLLM's
    ``load_weights`` takes. A peft model is merged while iterating (base weights + B·A·α/r) and
    unmerged afterwards; adapter tensors themselves are skipped."""
    model = getattr(model, "module", model)  # DDP / accelerate wrapper
    if not hasattr(model, "merge_adapter"):
        for name, p in model.named_parameters():
            yield name, p.data
        return
    model.merge_adapter()
    try:
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                continue
            yield name.removeprefix("base_model.model.").replace(".base_layer", ""), p.data
    finally:
        model.unmerge_adapter()


def request_seeds(keys: torch.Tensor | None, num_prompts: int, num_samples: int) -> list[int | None]:
    """One vLLM request seed per prompt (its first answer's key, folded to 63 bits), or None."""
    if keys is None:
        return [None] * num_prompts
    return [int(keys[i * num_samples]) & ((1 << 63) - 1) for i in range(num_prompts)]


class VLLMEngine:
    """An :data:`heed.rollout.engine.Engine` backed by an in-process vLLM ``LLM``."""

    def __init__(
        self,
        model_path: str,
        gpu_memory_utilization: float = 0.3,
        max_model_len: int | None = None,
        seed: int = 0,
        sleep: bool = True,
        dtype: str = "auto",
    ) -> None:
        check_vllm()
        from vllm import LLM

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # vLLM's external launcher joins the training processes' group: one engine per rank
            os.environ.setdefault("RANK", str(torch.distributed.get_rank()))
            os.environ.setdefault("WORLD_SIZE", str(torch.distributed.get_world_size()))
            os.environ.setdefault("LOCAL_RANK", "0")
        self.sleep_mode = sleep
        self.llm = LLM(
            model=model_path,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enable_sleep_mode=sleep,
            seed=seed,
            dtype=dtype,
            distributed_executor_backend="external_launcher",
            logprobs_mode="processed_logprobs",  # log-probs after temperature, as the trainer computes them
        )
        self.asleep = False
        if sleep:
            self.llm.sleep(level=2)
            self.asleep = True

    def push_weights(self, model: Any) -> None:
        """Copy the policy's current weights into vLLM (waking its weights first in sleep mode)."""
        if self.asleep:
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=["weights"])
        runner_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        for name, tensor in policy_weights(model):
            runner_model.load_weights([(name, tensor)])
        self.llm.reset_prefix_cache()

    def __call__(
        self,
        model: Any,
        tokenizer: Any,
        prompt_ids: list[list[int]],
        params: SamplingParams,
        num_samples: int,
        keys: torch.Tensor | None = None,
    ) -> Generation:
        from vllm import SamplingParams as VSamplingParams

        self.push_weights(model)
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
        stop = stop_ids(tokenizer, model)
        seeds = request_seeds(keys, len(prompt_ids), num_samples)
        sampling = [
            VSamplingParams(
                n=num_samples,
                temperature=params.temperature if params.do_sample else 0.0,
                top_p=params.top_p,
                top_k=params.top_k if params.top_k > 0 else -1,
                max_tokens=params.max_new_tokens,
                stop_token_ids=stop,
                logprobs=0,  # the sampled token's log-prob only
                seed=seed,
            )
            for seed in seeds
        ]
        outputs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids in prompt_ids], sampling_params=sampling, use_tqdm=False
        )
        rows: list[list[int]] = []
        completions: list[list[int]] = []
        logps: list[list[float]] = []
        for ids, out in zip(prompt_ids, outputs, strict=True):
            for sample in out.outputs:
                toks = list(sample.token_ids)
                rows.append(list(ids))
                completions.append(toks)
                logps.append(
                    [float(step[t].logprob) for step, t in zip(sample.logprobs or [], toks, strict=False)]
                    if sample.logprobs
                    else [0.0] * len(toks)
                )
        if self.sleep_mode:
            self.llm.sleep(level=2)
            self.asleep = True
        return build_generation(tokenizer, rows, completions, logps, stop)
