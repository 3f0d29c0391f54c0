"""megatron_lite: a small, readable LLM training stack on DeepSpeed with Megatron-style parallelism."""
__version__ = "0.1.0"
