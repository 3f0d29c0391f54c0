# lm-eval imports this file by path (`!function ml_data.NAME` in the YAMLs beside it); the loaders live in
# the package so that they are importable and tested like any other code.
from megatron_lite.eval.task_data import arithmetic, docstring_mc, heldout_text  # noqa: F401
