"""Megatron-style tensor parallelism: mappings (autograd collectives), parallel layers, vocab-parallel
cross entropy and the resharding helpers checkpoints use. Every function takes its process group
explicitly; group None means a single rank and everything reduces to plain torch.nn."""
from megatron_lite.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_lite.tensor_parallel.layers import (TENSOR_PARALLEL_LAYERS, ColumnParallelLinear,
                                                  RowParallelLinear, VocabParallelEmbedding, column_linear,
                                                  parallel_lm_logits, row_linear, vocab_embedding)
from megatron_lite.tensor_parallel.mappings import (copy_to_tensor_parallel_region,
                                                    gather_from_tensor_parallel_region, group_rank,
                                                    group_size, reduce_from_tensor_parallel_region,
                                                    scatter_to_tensor_parallel_region)
from megatron_lite.tensor_parallel.reshard import (ShardSpec, gather_state_dict, gather_state_dicts,
                                                   gather_tensor, reshard_state_dicts, shard_state_dict,
                                                   shard_tensor, tp_shard_specs)

__all__ = [
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "parallel_lm_logits",
    "column_linear", "row_linear", "vocab_embedding", "TENSOR_PARALLEL_LAYERS",
    "vocab_parallel_cross_entropy",
    "copy_to_tensor_parallel_region", "reduce_from_tensor_parallel_region",
    "scatter_to_tensor_parallel_region", "gather_from_tensor_parallel_region", "group_size", "group_rank",
    "ShardSpec", "shard_tensor", "gather_tensor", "tp_shard_specs", "shard_state_dict",
    "gather_state_dicts", "gather_state_dict", "reshard_state_dicts",
]
