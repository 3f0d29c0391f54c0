"""RMSNorm, computed in fp32 whatever the input dtype."""
from __future__ import annotations

import torch
import torch.nn as nn

from megatron_lite.tensor_parallel.mappings import copy_to_tensor_parallel_region


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, shared_over=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        # A tensor-parallel group whose ranks apply this one weight to different inputs (QK-norm: each rank
        # holds other heads): the weight's gradient is then the sum of theirs. None: the usual layer norm.
        self.shared_over = shared_over

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 even under bf16: the mean of squares loses too much precision in half.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return copy_to_tensor_parallel_region(self.weight, self.shared_over) * xf.to(x.dtype)
