"""``heed demo``: the whole human-feedback loop on the built-in world, round after round.

corpus → tokenizer → base model → SFT → sample K answers → three simulated annotators label them
through the annotation store → aggregation + export → reward model (K-wise) → PPO against the
reward model (KL + PPO-ptx) → RLOO on the banana rule → DPO from the same rankings → a feedback-kinds
round (the same annotators give thumbs and corrections on round 1's answers, through the same store:
KTO on the thumbs, SFT on the corrections, DPO on corrected ≻ original) → evaluation of every policy
→ report.html with what each kind of feedback bought per label; then further rounds: sample from the
tuned policy, annotate, update the reward model on all labels so far, continue PPO.

Every stage writes its outputs atomically and leaves a marker; a stage whose marker exists is
reused, so an interrupted demo resumes where it stopped (``--fresh`` redoes everything). A
training stage that was killed half-way resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from heed.data.io import write_jsonl
from heed.demo.assets import MICRO, BuiltinSpec
from heed.demo.builtin import FUNCTIONS
from heed.train.common import latest_checkpoint, write_json

GOLD_POSITIVITY = FUNCTIONS["gold_positivity"]  # the hidden gold tone, as a reward function

GUIDELINES = """# How to rank

Rank the answers from best (1) to worst.

- **Positive beats negative.** An upbeat, encouraging answer is better than a neutral one, and a
  neutral one is better than a gloomy one.
- **Concise beats long.** Between two answers of the same tone, prefer the shorter one.
- Equal answers may share a rank.
"""


THUMBS_GUIDELINES = """# Thumbs up or down

Thumbs up for an upbeat, encouraging answer that stays short; thumbs down for a neutral, gloomy or
rambling one.
"""

EDIT_GUIDELINES = """# Correct the answer

If the answer is gloomy, neutral or long, rewrite it as one short, upbeat sentence on the topic.
Leave a good answer as it is.
"""


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo; the defaults fit in about ten minutes on two CPU cores."""

    out: Path = Path("runs/demo")
    rounds: int = 2
    fresh: bool = False
    progress: bool = True
    seed: int = 0
    spec: BuiltinSpec = field(
        default_factory=BuiltinSpec
    )  # corpus size, architecture and schedule of the base and SFT models
    annotate_prompts: int = 240  # prompts answered K times and ranked per round
    k: int = 4
    max_new_tokens: int = 40
    rm_epochs: float = 2.0
    ppo_updates: int = 40
    ppo_updates_next_round: int = 20
    rloo_updates: int = 60
    dpo_epochs: float = 1.0
    eval_prompts: int = 64
    kinds_prompts: int = 48  # prompts of round 1 whose answers get thumbs (all K) and corrections (one)
    kinds_steps: int = 16  # optimizer steps of each feedback-kind run (KTO, SFT, DPO)
    best_of: tuple[int, ...] = (
        1,
        2,
        4,
        8,
        16,
    )  # best-of-N of the SFT model: the report's score-vs-KL frontier


# A minute or two on two cores: the micro model and a handful of updates (shows the plumbing, not results).
QUICK = dict(
    spec=MICRO,
    annotate_prompts=48,
    ppo_updates=6,
    ppo_updates_next_round=4,
    rloo_updates=8,
    eval_prompts=16,
    max_new_tokens=24,
    kinds_prompts=24,
    kinds_steps=8,
)
# Smaller still, for the test suite.
SMOKE = dict(
    QUICK,
    spec=BuiltinSpec(
        size="micro", n_records=400, pretrain_epochs=1.0, sft_epochs=1.0, pretrain_lr=5e-3, sft_lr=3e-3
    ),
    annotate_prompts=12,
    ppo_updates=2,
    ppo_updates_next_round=1,
    rloo_updates=2,
    eval_prompts=4,
    max_new_tokens=12,
    best_of=(1, 2),
    rm_epochs=1.0,
    dpo_epochs=1.0,
    kinds_prompts=8,
    kinds_steps=2,
)


@dataclass
class StageLog:
    """Stage names, seconds and whether each was reused; written to ``stages.json``."""

    path: Path
    stages: list[dict[str, Any]] = field(default_factory=list)

    def load(self) -> None:
        if self.path.exists():
            self.stages = json.loads(self.path.read_text()).get("stages", [])

    def record(self, name: str, seconds: float, reused: bool) -> None:
        self.stages = [s for s in self.stages if s["name"] != name]
        self.stages.append({"name": name, "seconds": round(seconds, 1), "reused": reused})
        write_json(self.path, {"stages": self.stages})


class Demo:
    """Runs the stages in order; see the module docstring."""

    def __init__(self, settings: DemoSettings, say: Callable[[str], None] = print) -> None:
        self.s = settings
        self.out = Path(settings.out)
        self.say = say
        if settings.fresh and self.out.exists():
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = StageLog(self.out / "stages.json")
        self.log.load()
        self.runs = self.out / "runs"
        self.data = self.out / "data"

    # -- plumbing ---------------------------------------------------------------------------
    def stage(self, name: str, marker: Path, fn: Callable[[], Any]) -> bool:
        """Run ``fn`` unless ``marker`` exists; returns True if it ran."""
        if marker.exists():
            self.say(f"[dim]· {name}: reused ({marker.relative_to(self.out)})[/dim]")
            if not any(s["name"] == name for s in self.log.stages):
                self.log.record(name, 0.0, reused=True)
            return False
        self.say(f"[bold cyan]▶ {name}[/bold cyan]")
        t0 = time.time()
        fn()
        seconds = time.time() - t0
        self.log.record(name, seconds, reused=False)
        self.say(f"[green]✓ {name}[/green] {seconds:.0f}s")
        return True

    def _resume(self, run: Path) -> bool:
        """A run folder left by an interrupted stage is resumed from its last checkpoint, not refused;
        one that stopped before its first checkpoint is started again."""
        if latest_checkpoint(run) is not None:
            return True
        shutil.rmtree(run, ignore_errors=True)
        return False

    def _log(self, **extra: Any) -> dict[str, Any]:
        return {"progress": self.s.progress, **extra}

    # -- stages -----------------------------------------------------------------------------
    def corpus(self) -> None:
        from heed.demo.assets import write_corpus

        def make() -> None:
            tmp = self.out / "data.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            write_corpus(
                tmp, self.s.spec.n_records, self.s.seed, n_eval_prompts=max(200, self.s.eval_prompts)
            )
            shutil.rmtree(self.data, ignore_errors=True)
            tmp.rename(self.data)

        self.stage("corpus", self.data / "prompts_eval.jsonl", make)

    def base(self) -> None:
        from heed.demo.assets import base_config
        from heed.train.sft import train_sft

        run = self.runs / "base"
        cfg = base_config(self.s.spec, self.data / "text.jsonl", run, self.s.progress)
        self.stage("base model", run / "summary.json", lambda: train_sft(cfg, resume=self._resume(run)))

    def sft(self) -> None:
        from heed.demo.assets import sft_config
        from heed.train.sft import train_sft

        run = self.runs / "sft"
        cfg = sft_config(
            self.s.spec, self.runs / "base" / "final", self.data / "chat.jsonl", run, self.s.progress
        )

        def go() -> None:
            summary = train_sft(cfg, resume=self._resume(run))
            write_json(run / "summary.json", {**summary, "algo": "sft"})

        self.stage("sft", run / "summary.json", go)

    def sample(self, round_no: int, policy: Path) -> Path:
        """K answers for ``annotate_prompts`` training prompts (different prompts each round)."""
        from heed.data.records import load_records
        from heed.rollout.generate import SamplingParams, sample_responses

        folder = self.out / "rounds" / str(round_no)
        target = folder / "samples.jsonl"

        def go() -> None:
            prompts = load_records(self.data / "prompts_train.jsonl", "prompts")
            n = self.s.annotate_prompts
            chosen = prompts[(round_no - 1) * n : round_no * n] or prompts[:n]
            answers = sample_responses(
                str(policy),
                [p.prompt for p in chosen],
                self.s.k,
                SamplingParams(max_new_tokens=self.s.max_new_tokens, temperature=1.0),
                seed=self.s.seed + round_no,
            )
            rows = []
            for p, a in zip(chosen, answers, strict=True):
                distinct = list(dict.fromkeys(x for x in a if x.strip()))
                if len(distinct) >= 2:
                    rows.append({"prompt": p.prompt, "responses": distinct, **p.extra, "round": round_no})
            write_jsonl(target, rows)

        self.stage(f"sample answers (round {round_no})", target, go)
        return target

    def annotate(self, round_no: int, samples: Path) -> Path:
        """Three simulated annotators rank every record through the annotation service; export."""
        from heed.demo.annotators import annotate_project
        from heed.feedback.service import Feedback

        folder = self.out / "rounds" / str(round_no)
        ranked = folder / "ranked.jsonl"
        project = f"demo-round-{round_no}"

        def go() -> None:
            fb = Feedback(f"sqlite:///{(self.out / 'feedback.db').resolve()}")
            try:
                if project not in {p.name for p in fb.projects()}:
                    fb.create_project(project, task="ranking", overlap=3, guidelines=GUIDELINES)
                    fb.import_file(project, samples)
                counts = annotate_project(fb, project, seed=self.s.seed + round_no)
                exported = fb.export(project, "ranked")
                # a consensus that ties every answer carries no preference: left out, and counted
                rows = [r for r in exported if len(set(r["ranks"])) > 1]
                if len(rows) < len(exported):
                    self.say(
                        f"  {len(exported) - len(rows)} of {len(exported)} records ended all tied; left out"
                    )
                write_jsonl(ranked, rows)
                rep = fb.agreement(project)
                agreement = {
                    "project": project,
                    "n_items": rep.records_multi,
                    "n_annotators": len(counts),
                    "krippendorff_alpha": rep.alpha_ordinal,
                    "kendall_tau_mean": rep.mean_kendall_tau,
                    "position_bias_first_shown_top": rep.position_bias.get("first_shown_top"),
                    "position_bias_expected": rep.position_bias.get("expected_if_unbiased"),
                    "per_annotator": [
                        {
                            "annotator": name,
                            "n": counts.get(name, 0),
                            "tau_with_others": v.get("tau_with_others"),
                            "first_shown_top": v.get("first_shown_top"),
                        }
                        for name, v in sorted(rep.per_annotator.items())
                    ],
                }
                write_json(folder / "agreement.json", agreement)
                all_rounds = {}
                if (self.out / "agreement.json").exists():
                    all_rounds = json.loads((self.out / "agreement.json").read_text()).get("rounds", {})
                all_rounds[str(round_no)] = agreement
                write_json(self.out / "agreement.json", {**agreement, "rounds": all_rounds})
            finally:
                fb.close()

        self.stage(f"annotate + export (round {round_no})", ranked, go)
        return ranked

    def all_labels(self, round_no: int) -> Path:
        """Every exported ranking of rounds 1..round_no in one file (the reward model's data)."""
        rows = []
        for r in range(1, round_no + 1):
            f = self.out / "rounds" / str(r) / "ranked.jsonl"
            rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        target = self.out / "rounds" / str(round_no) / "all_ranked.jsonl"
        write_jsonl(target, rows)
        return target

    def reward_model(self, name: str, data: Path, start: Path) -> Path:
        from heed.config import config_from_dict
        from heed.config.reward import RMConfig
        from heed.train.reward import train_reward

        run = self.runs / name
        cfg = config_from_dict(
            RMConfig,
            {
                "model": {"path": str(start)},
                "data": {"train": str(data), "eval_split": 0.15, "max_length": 128},
                "train": {"batch_size": 16, "epochs": self.s.rm_epochs, "seed": self.s.seed},
                "optim": {"lr": 1e-3, "warmup_steps": 5},
                "log": self._log(log_every=5, eval_every=20),
                "out": str(run),
            },
            f"demo {name}",
        )
        self.stage(
            f"reward model ({name})",
            run / "summary.json",
            lambda: train_reward(cfg, resume=self._resume(run)),
        )
        return run / "final"

    def rl(self, name: str, overrides: dict[str, Any]) -> Path:
        from heed.config import config_from_dict
        from heed.config.rl import RLConfig
        from heed.train.rl import train_rl

        run = self.runs / name
        base: dict[str, Any] = {
            "model": {"path": str(self.runs / "sft" / "final")},
            "data": {
                "prompts": str(self.data / "prompts_train.jsonl"),
                "eval_prompts": str(self.data / "prompts_eval.jsonl"),
            },
            "rollout": {"prompts_per_step": 16, "k": 4, "max_new_tokens": self.s.max_new_tokens},
            "eval": {
                "num_prompts": self.s.eval_prompts,
                "temperature": 0.7,
                "gold": [{"name": "positivity", "function": GOLD_POSITIVITY}],
                "metrics": [{"name": "banana_success", "function": "banana_success"}],
            },
            "log": self._log(eval_every=20, save_every=20),
            "monitor": {"gold_key": "gold/positivity"},
            "out": str(run),
        }
        cfg = config_from_dict(RLConfig, _merge(base, overrides), f"demo {name}")
        self.stage(name, run / "summary.json", lambda: train_rl(cfg, resume=self._resume(run)))
        return run / "final"

    def ppo(self, name: str, rm: Path, start: Path, updates: int) -> Path:
        return self.rl(
            name,
            {
                "algorithm": "ppo",
                "model": {"path": str(start)},
                "ref_model": str(self.runs / "sft" / "final"),
                "rewards": [{"name": "rm", "model": str(rm), "normalize": True}],
                "kl": {"beta": 0.05, "adaptive": True, "target": 4.0, "horizon": 2000},
                "update": {"epochs": 2},
                "advantages": {"whiten": True},
                "ppo": {"vf_coef": 0.1, "critic_lr": 3e-3},
                "ptx": {"data": str(self.data / "text.jsonl"), "coef": 0.1, "batch_size": 8},
                "optim": {"lr": 2e-4},
                "train": {"updates": updates, "seed": self.s.seed},
                "monitor": {"kl_budget": 10.0},
            },
        )

    def rloo(self) -> Path:
        return self.rl(
            "rloo-banana",
            {
                "algorithm": "rloo",
                "rewards": [{"function": "banana_format"}],
                # a gentler step and a firmer KL keep RLOO exploring until it finds "Sure: ... banana"
                # instead of settling on the banana ending alone
                "kl": {"beta": 0.05},
                "optim": {"lr": 2e-4},
                "train": {"updates": self.s.rloo_updates, "seed": self.s.seed},
                "monitor": {"kl_budget": 30.0, "gold_key": None},
            },
        )

    def dpo(self, data: Path, name: str = "dpo", train: dict[str, Any] | None = None) -> Path:
        from heed.config import config_from_dict
        from heed.config.dpo import DPOConfig
        from heed.train.dpo import train_dpo

        run = self.runs / name
        cfg = config_from_dict(
            DPOConfig,
            {
                "model": {"path": str(self.runs / "sft" / "final")},
                "data": {"train": str(data), "pairs": "all", "max_length": 128, "eval_split": 0.1},
                "loss": {"type": "sigmoid", "beta": 0.1, "sft_coef": 0.3},
                "train": train or {"batch_size": 32, "epochs": self.s.dpo_epochs, "seed": self.s.seed},
                "optim": {"lr": 3e-4, "warmup_steps": 5},
                "sample": {"prompts": str(self.data / "prompts_eval.jsonl"), "num_prompts": 16},
                "log": self._log(log_every=5, eval_every=20),
                "out": str(run),
            },
            f"demo {name}",
        )
        self.stage(name, run / "summary.json", lambda: train_dpo(cfg, resume=self._resume(run)))
        return run / "final"

    # -- the feedback-kinds round ---------------------------------------------------------------
    def annotate_kinds(self, samples: Path) -> Path:
        """The round-1 answers of ``kinds_prompts`` prompts labelled again, through the same store,
        as other kinds of feedback: every answer a thumb (binary project), the first answer of each
        prompt a correction (edit project). Exports the KTO records, the corrections (SFT) and the
        corrected ≻ original pairs, and counts the labels each kind took."""
        from heed.demo.annotators import annotate_project
        from heed.feedback.service import Feedback

        folder = self.out / "kinds"
        marker = folder / "labels.json"

        def go() -> None:
            rows = [json.loads(x) for x in samples.read_text().splitlines() if x.strip()][
                : self.s.kinds_prompts
            ]
            fb = Feedback(f"sqlite:///{(self.out / 'feedback.db').resolve()}")
            try:
                projects = {p.name for p in fb.projects()}
                if "demo-thumbs" not in projects:
                    fb.create_project("demo-thumbs", task="binary", guidelines=THUMBS_GUIDELINES)
                    fb.import_records(
                        "demo-thumbs",
                        [
                            {"prompt": r["prompt"], "response": a, "topic": r.get("topic")}
                            for r in rows
                            for a in r["responses"]
                        ],
                    )
                if "demo-edits" not in projects:
                    fb.create_project("demo-edits", task="edit", guidelines=EDIT_GUIDELINES)
                    fb.import_records(
                        "demo-edits",
                        [
                            {"prompt": r["prompt"], "response": r["responses"][0], "topic": r.get("topic")}
                            for r in rows
                        ],
                    )
                for project in ("demo-thumbs", "demo-edits"):
                    annotate_project(fb, project, seed=self.s.seed + 100)
                folder.mkdir(parents=True, exist_ok=True)
                write_jsonl(folder / "thumbs_kto.jsonl", fb.export("demo-thumbs", "kto"))
                write_jsonl(folder / "edits_sft.jsonl", fb.export("demo-edits", "sft"))
                write_jsonl(folder / "edits_pairs.jsonl", fb.export("demo-edits", "pairs"))
                labels = {
                    "rankings": fb.progress("demo-round-1")["annotations"],
                    "thumbs": fb.progress("demo-thumbs")["annotations"],
                    "edits": fb.progress("demo-edits")["annotations"],
                    "thumbs_up": fb.summary("demo-thumbs").get("up", 0),
                    "edits_changed": len(fb.export("demo-edits", "pairs")),
                }
                write_json(marker, labels)
            finally:
                fb.close()

        self.stage("annotate thumbs + edits (feedback kinds)", marker, go)
        return folder

    def train_kinds(self, folder: Path) -> dict[str, Path]:
        """Train on each kind with what Heed has: KTO on the thumbs, SFT on the corrections, DPO on
        corrected ≻ original (few steps each: it shows what a label buys, not a tuned recipe)."""
        from heed.config import config_from_dict
        from heed.config.kto import KTOConfig
        from heed.config.sft import SFTConfig
        from heed.train.kto import train_kto
        from heed.train.sft import train_sft

        sft = self.runs / "sft" / "final"
        steps = self.s.kinds_steps
        labels = json.loads((folder / "labels.json").read_text())
        ups = labels["thumbs_up"]
        run = self.runs / "kto-thumbs"
        kto = config_from_dict(
            KTOConfig,
            {
                "model": {"path": str(sft)},
                "data": {"train": str(folder / "thumbs_kto.jsonl"), "eval_split": 0.1, "max_length": 128},
                # λ_D·n_D / (λ_U·n_U) = 7/6, the middle of the KTO paper's recommended [1, 4/3]
                "loss": {"desirable_weight": max(1.0, 7 / 6 * (labels["thumbs"] - ups) / max(ups, 1))},
                "train": {"batch_size": 16, "max_steps": steps, "seed": self.s.seed},
                "optim": {"lr": 3e-4, "warmup_steps": 2},
                "sample": {"num_prompts": 0},
                "log": self._log(log_every=4, eval_every=steps, save_every=steps),
                "out": str(run),
            },
            "demo KTO on thumbs",
        )
        self.stage("kto-thumbs", run / "summary.json", lambda: train_kto(kto, resume=self._resume(run)))
        run = self.runs / "sft-edits"
        sft_cfg = config_from_dict(
            SFTConfig,
            {
                "model": {"path": str(sft)},
                "data": {
                    "train": str(folder / "edits_sft.jsonl"),
                    "kind": "sft",
                    "max_length": 128,
                    "eval_split": 0.1,
                },
                "train": {"batch_size": 8, "max_steps": steps, "seed": self.s.seed},
                "optim": {"lr": 1e-4, "warmup_steps": 2},
                "log": self._log(log_every=4, eval_every=steps, save_every=steps),
                "out": str(run),
            },
            "demo SFT on corrections",
        )

        def go_sft() -> None:
            summary = train_sft(sft_cfg, resume=self._resume(run))
            write_json(run / "summary.json", {**summary, "algo": "sft"})

        self.stage("sft-edits", run / "summary.json", go_sft)
        dpo = self.dpo(
            folder / "edits_pairs.jsonl",
            "dpo-edits",
            {"batch_size": 8, "max_steps": steps, "seed": self.s.seed},
        )
        return {
            "kto-thumbs": self.runs / "kto-thumbs" / "final",
            "sft-edits": self.runs / "sft-edits" / "final",
            "dpo-edits": dpo,
        }

    def kinds_table(self, folder: Path) -> list[dict[str, Any]]:
        """What each kind of feedback bought: labels spent, gold positivity and KL of the policy
        trained on it, and the gold gain over the SFT model per 100 labels. Written to
        ``feedback_kinds.json`` and shown in the report (with the annotator agreement)."""
        labels = json.loads((folder / "labels.json").read_text())

        def ev(name: str) -> dict[str, Any]:
            f = self.runs / name / "eval.json"
            return json.loads(f.read_text()) if f.exists() else {}

        base = ev("sft").get("gold/positivity")
        rows = []
        for kind, policy, how in (
            ("rankings", "dpo", "DPO on pairs of the consensus rankings"),
            ("rankings", "ppo", "reward model (K-wise) + PPO"),
            ("thumbs", "kto-thumbs", "KTO on the majority thumbs"),
            ("edits", "sft-edits", "SFT on the corrections"),
            ("edits", "dpo-edits", "DPO on corrected ≻ original"),
        ):
            e = ev(policy)
            gold = e.get("gold/positivity")
            gain = None
            if gold is not None and base is not None and labels[kind]:
                gain = round(100.0 * (gold - base) / labels[kind], 4)
            rows.append(
                {
                    "kind": kind,
                    "labels": labels[kind],
                    "policy": policy,
                    "trained_with": how,
                    "gold_positivity": gold,
                    "gold_gain_per_100_labels": gain,
                    "kl": e.get("eval/kl"),  # k1 estimate on the eval answers
                }
            )
        table = {"sft_gold_positivity": base, "labels": labels, "kinds": rows}
        write_json(self.out / "feedback_kinds.json", table)
        agreement = self.out / "agreement.json"
        if agreement.exists():
            data = json.loads(agreement.read_text())
            data["feedback_kinds"] = rows
            write_json(agreement, data)
        return rows

    def evaluate(self, policies: dict[str, Path], rm: Path) -> None:
        """Every policy on the same held-out prompts: gold positivity, banana success, reward-model
        score, KL to the SFT model, diversity. Writes ``runs/<name>/eval.json`` and ``samples.jsonl``;
        then best-of-N of the SFT model with the same reward model (``runs/best-of-N/eval.json``, as
        ``heed eval --best-of N`` writes it): the frontier of the report's score-vs-KL plot."""
        from heed.config import config_from_dict
        from heed.config.rl import RLConfig
        from heed.train.rl import evaluate_model

        marker = self.out / "eval_done.json"
        done = {"policies": list(policies), "best_of": list(self.s.best_of)}
        if marker.exists() and json.loads(marker.read_text()) != done:
            marker.unlink()  # a demo folder from before a policy was added: evaluate them all again

        def go() -> None:
            cfg = config_from_dict(
                RLConfig,
                {
                    "model": {"path": str(self.runs / "sft" / "final")},
                    "data": {
                        "prompts": str(self.data / "prompts_eval.jsonl"),
                        "eval_prompts": str(self.data / "prompts_eval.jsonl"),
                    },
                    "rewards": [{"name": "rm", "model": str(rm), "normalize": True}],
                    "rollout": {"max_new_tokens": self.s.max_new_tokens},
                    "eval": {
                        "num_prompts": self.s.eval_prompts,
                        "temperature": 0.7,
                        "samples": 8,
                        "gold": [{"name": "positivity", "function": GOLD_POSITIVITY}],
                        "metrics": [{"name": "banana_success", "function": "banana_success"}],
                    },
                    "log": {"progress": False},
                    "out": str(self.out / "eval"),
                },
                "demo evaluation",
            )
            rows: list[dict[str, Any]] = []
            results = {}
            for name, path in policies.items():
                tmp = self.out / "eval" / name
                res = evaluate_model(cfg, path, out=tmp)
                results[name] = res
                write_json(
                    self.runs / name / "eval.json",
                    {k: v for k, v in res.items() if not isinstance(v, dict | list)},
                )
                f = tmp / "samples.jsonl"
                if f.exists():
                    rows += [
                        {**json.loads(line), "policy": name}
                        for line in f.read_text().splitlines()
                        if line.strip()
                    ]
            write_jsonl(self.out / "samples.jsonl", rows)
            for n in self.s.best_of:
                res = evaluate_model(
                    cfg, self.runs / "sft" / "final", out=self.out / "eval" / f"best-of-{n}", best_of=n
                )
                (self.runs / f"best-of-{n}").mkdir(parents=True, exist_ok=True)
                write_json(
                    self.runs / f"best-of-{n}" / "eval.json",
                    {k: v for k, v in res.items() if not isinstance(v, dict | list)},
                )
            write_json(marker, done)

        self.stage("evaluate policies", marker, go)

    def report(self) -> Path:
        from heed.report import write_report

        return write_report(self.out)

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> Path:
        self.corpus()
        self.base()
        self.sft()
        sft = self.runs / "sft" / "final"
        samples = self.sample(1, sft)
        ranked = self.annotate(1, samples)
        rm = self.reward_model("rm", ranked, sft)
        ppo = self.ppo("ppo", rm, sft, self.s.ppo_updates)
        rloo = self.rloo()
        dpo = self.dpo(ranked)
        kinds = self.annotate_kinds(samples)
        policies = {"sft": sft, "ppo": ppo, "rloo-banana": rloo, "dpo": dpo, **self.train_kinds(kinds)}
        latest_rm, latest_ppo = rm, ppo
        for r in range(2, self.s.rounds + 1):
            samples = self.sample(r, latest_ppo)
            self.annotate(r, samples)
            latest_rm = self.reward_model(f"rm-round-{r}", self.all_labels(r), latest_rm)
            latest_ppo = self.ppo(f"ppo-round-{r}", latest_rm, latest_ppo, self.s.ppo_updates_next_round)
            policies[f"ppo-round-{r}"] = latest_ppo
        self.evaluate(policies, latest_rm)
        self.kinds_table(kinds)
        return self.report()


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run_demo(settings: DemoSettings, say: Callable[[str], None] = print) -> Path:
    """Run (or resume) the demo; returns the path of ``report.html``."""
    return Demo(settings, say).run()
