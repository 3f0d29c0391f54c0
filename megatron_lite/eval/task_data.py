"""The held-out data of the local lm-eval tasks, built from the embedded corpus in memory (no download,
no files): the `custom_dataset` loaders that tasks/*.yaml name through tasks/ml_data.py.

lm-eval calls a loader with the task's `metadata` and `dataset_kwargs` as keyword arguments (the latter set
in the YAML: the corpus size and seed the held-out split was drawn with); other keys are ignored.
"""
from __future__ import annotations


def _test_split(rows: list[dict]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def arithmetic(sft_arith: int = 4000, seed: int = 0, **_):
    from megatron_lite.data.corpus import heldout_arithmetic

    return _test_split([{"question": q, "answer": a} for q, a in heldout_arithmetic(sft_arith, seed)])


def docstring_mc(n_choices: int = 4, seed: int = 0, **_):
    from megatron_lite.data.corpus import heldout_docstring_choices

    return _test_split(heldout_docstring_choices(n_choices, seed))


def heldout_text(pretrain_mb: float = 8.0, seed: int = 0, **_):
    from megatron_lite.data.corpus import heldout_documents

    return _test_split([{"text": t} for t in heldout_documents(pretrain_mb, seed)])
