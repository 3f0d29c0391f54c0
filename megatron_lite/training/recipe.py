"""Per-preset training recipe: what `launch/pretrain.py --model NAME` uses when neither a flag nor the ds_config
sets the optimizer, learning rates, warmup, decay, weight decay, Adam betas or gradient clipping, and how
pretraining initialises.

Precedence, most specific first: a command-line flag, then an explicit value in the ds_config JSON, then this
table (the shipped ds_configs leave these entries "auto"). The tiny and tiny-moe values are measured
(benchmarks/results.md, "Training recipe at the main job's full budget", "Batch size, lr and zero-init",
"Adam beta2", "Muon, unclipped", "A 0.6x main job" and "A fast input embedding"; tiny's lrs at the main
job's budget, which benchmarks/time_to_quality.py defaults to); the larger presets' follow the usual scaling (a
lower peak lr for wider models, and always a warmup: a wide model at a small model's lr with no warmup diverges
in its first steps) and keep AdamW and cosine until measured.
"""
from __future__ import annotations

from dataclasses import dataclass

OPTIMIZERS = ("adamw", "muon")
DECAY_STYLES = ("cosine", "wsd")


@dataclass(frozen=True)
class Recipe:
    optimizer: str = "adamw"
    lr: float = 1e-3  # AdamW's peak lr; with Muon the lr of its AdamW side (embeddings, norms, router, head)
    embedding_lr: float | None = None  # the input embedding's peak lr (AdamW); None: `lr`
    muon_lr: float = 0.02  # peak lr of Muon's matrices (units of spectral norm per step)
    min_lr_ratio: float = 0.1  # the decay's floor, as a fraction of the peak
    warmup_frac: float = 0.0  # linear warmup over this fraction of --train-iters (at least 1 step when > 0)
    decay_style: str = "cosine"
    wsd_decay_frac: float = 0.2  # WSD: the linear decay takes this last fraction of --train-iters
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm (0: off); Muon runs unclipped, see ds_config._settle_clip
    adam_beta1: float = 0.9  # AdamW's (and Muon's AdamW side's) moment decay rates
    adam_beta2: float = 0.95
    zero_init_output: bool = False  # pretraining starts with every residual-stream output projection at 0


    def warmup_iters(self, train_iters: int) -> int:
        return max(1, round(self.warmup_frac * train_iters)) if self.warmup_frac > 0 else 0


# What a ds_config entry of "auto" means without a preset (direct resolve_ds_config calls): the values
# the shipped ds_configs held before they became "auto".
FALLBACK = Recipe()

# tiny and tiny-moe share one recipe (Muon on the experts' matrices too, the router on AdamW).
_TINY = Recipe(optimizer="muon", muon_lr=0.005, lr=2e-3, embedding_lr=0.03, warmup_frac=0.05, decay_style="wsd",
               min_lr_ratio=0.0, zero_init_output=True, adam_beta2=0.99)

RECIPES: dict[str, Recipe] = {
    "tiny": _TINY,
    "tiny-moe": _TINY,
    "small": Recipe(optimizer="adamw", lr=1e-3, warmup_frac=0.05),
    "mini-llm": Recipe(optimizer="adamw", lr=3e-4, warmup_frac=0.05),
    "mini-moe": Recipe(optimizer="adamw", lr=3e-4, warmup_frac=0.05),
}


# Fine-tuning from a pretrained checkpoint (launch/sft.py), whatever the preset: a short warmup keeps the first
# steps on a new data format from undoing pretraining.
SFT = Recipe(optimizer="adamw", lr=1e-3, warmup_frac=0.05)


def recipe_for(preset: str | None, sft: bool = False) -> Recipe:
    return SFT if sft else RECIPES.get(preset or "", FALLBACK)


def recipe_value(flag, preset: str | None, name: str):
    """A command-line flag's value when given (not None), else the preset's recipe entry `name`."""
    return getattr(recipe_for(preset), name) if flag is None else flag
