"""EleutherAI's lm-evaluation-harness (`lm_eval`) on an HF export, with our local tasks.

    python launch/eval.py --harness --hf HFDIR --output F.json [--tasks ml_arithmetic ...] [--limit N]

The local tasks (tasks/*.yaml, package data) read the held-out half of the embedded corpus in memory:
    ml_arithmetic     generate_until, exact_match     held-out arithmetic questions (sft_valid)
    ml_docstring_mc   multiple_choice, acc            held-out stdlib functions: real docstring summary vs others
    ml_heldout_bpb    loglikelihood_rolling, bits_per_byte   held-out stdlib files (pretrain_valid)
Any other name goes to lm-eval's own registry (hellaswag, arc_easy, ...: those download their data).
The same tasks run from lm-eval's CLI: `lm_eval --model hf --model_args pretrained=HFDIR
--include_path <this folder>/tasks --tasks ml_heldout_bpb`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from megatron_lite.errors import UserError

TASK_DIR = Path(__file__).resolve().parent / "tasks"
LOCAL_TASKS = ("ml_arithmetic", "ml_docstring_mc", "ml_heldout_bpb")


def check_hf_folder(hf_dir: str | Path) -> Path:
    p = Path(hf_dir)
    if not (p / "config.json").is_file():
        raise UserError(f"--hf {hf_dir}: no HF model folder there (config.json missing); export one with "
                        f"tools/convert_to_hf.py --load CKPT --output {hf_dir}")
    return p


def task_manager(tasks: list[str]):
    """lm-eval's TaskManager over our tasks folder; lm-eval's own registry (slow to index) only when needed."""
    from lm_eval.tasks import TaskManager

    local_only = all(t in LOCAL_TASKS for t in tasks)
    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=not local_only)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise UserError(f"--tasks: unknown task {unknown[0]!r}; local tasks are {', '.join(LOCAL_TASKS)}, "
                        "or name any task of lm-eval's registry (`lm_eval ls tasks`)")
    return tm


def has_chat_template(hf_dir: Path) -> bool:
    from transformers import AutoTokenizer

    return bool(getattr(AutoTokenizer.from_pretrained(str(hf_dir)), "chat_template", None))


def run_harness(hf_dir: str | Path, tasks: list[str] | None = None, output: str | Path | None = None,
                limit: int | None = None, batch_size: int = 8, device: str | None = None,
                dtype: str | None = None, chat_template: bool | None = None) -> dict:
    """Run lm-eval (`--model hf`) and return its results dict (`results[TASK][METRIC]`); `output` gets it
    as JSON, as lm-eval's CLI writes it (without per-sample logs).

    chat_template None: apply the tokenizer's chat template when it has one. Our exports are fine-tuned on
    ChatML, and the local tasks' questions are the user turns of that format."""
    hf_dir = check_hf_folder(hf_dir)
    tasks = list(tasks or LOCAL_TASKS)
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    tm = task_manager(tasks)
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # bf16 matmuls are very slow on CPUs; the folder's own dtype elsewhere.
    dtype = dtype or ("float32" if device == "cpu" else "auto")
    if chat_template is None:
        chat_template = has_chat_template(hf_dir)
    results = simple_evaluate(
        model="hf", model_args={"pretrained": str(hf_dir), "dtype": dtype}, tasks=tasks, task_manager=tm,
        limit=limit, batch_size=batch_size, device=device, apply_chat_template=chat_template,
        log_samples=False)
    if results is None:  # lm-eval returns results on its rank 0 only
        return {}
    results.pop("samples", None)
    if output is not None:
        text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp, out)  # never a half-written results file
    return results
