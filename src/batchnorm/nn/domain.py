"""DomainBatchNorm1d/2d/3d: K sets of running statistics, one per domain, chosen per call.

    y = gamma_k * (x - E[x]) / sqrt(Var[x] + eps) + beta_k,   k = the call's `domain`,

batch norm whose running statistics (and, with shared_affine=False, gamma and beta) are kept per
domain: training on a batch of domain k uses its batch statistics and updates only domain k's
running statistics; eval normalizes with domain k's. This is domain-specific batch norm for
multi-domain training and adaptation (Chang et al. 2019, arXiv 1906.03950; AdaBN, Li et al.
2016, arXiv 1603.04779, re-estimates a target domain's statistics the same way). With one domain
the layer is BatchNorm.

State: `running_mean`, `running_var` of shape (K, C), `num_batches_tracked` of shape (K,), and
`weight`, `bias` of shape (C,) (shared) or (K, C) (per domain): BatchNorm's names with a leading
domain dimension. A BatchNorm state_dict loads into every domain (each (C,) tensor is repeated
K times), so a pretrained model's statistics seed all domains.

Args (all layers):
    num_features, eps, momentum, affine, track_running_stats, device, dtype: as BatchNorm.
    num_domains: K, > 0.
    shared_affine: one gamma/beta for all domains (default) or one per domain.

Shape: forward(input, domain); domain an int or a one-element integer tensor in [0, K) (a tensor
keeps a compiled model from recompiling per domain); output shaped like input.

Raises:
    TypeError: a domain that is not an int or integer tensor.
    ValueError: num_domains <= 0, a domain tensor with more than one element, and everything
        BatchNorm raises.
    IndexError: a domain outside [0, K).
"""

from __future__ import annotations

import torch
from torch import Tensor

from batchnorm import functional as F
from batchnorm.nn.batchnorm import BatchNormBase


class DomainBatchNormBase(BatchNormBase):
    """The shared state and forward of DomainBatchNorm1d/2d/3d; see the module docstring.

    Subclasses BatchNormBase (state_dict names, `reset_running_stats`, `_BatchNorm` checks) but
    not torch.nn.BatchNorm1d/2d/3d: its statistics have a domain dimension, so tools that fold or
    freeze BatchNormNd by type must leave it alone.
    """

    syncable = False

    def __init__(self, num_features: int, num_domains: int, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *,
                 shared_affine: bool = True) -> None:
        if isinstance(num_domains, bool) or not isinstance(num_domains, int) or num_domains <= 0:
            raise ValueError(f"{type(self).__name__}({num_features!r}): num_domains must be a "
                             f"positive int, got {num_domains!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.num_domains, self.shared_affine = num_domains, shared_affine
        factory = {"device": device, "dtype": dtype}
        if affine and not shared_affine:
            self.weight = torch.nn.Parameter(torch.ones(num_domains, num_features, **factory))
            self.bias = torch.nn.Parameter(torch.zeros(num_domains, num_features, **factory))
        if track_running_stats:
            self.running_mean = torch.zeros(num_domains, num_features, **factory)
            self.running_var = torch.ones(num_domains, num_features, **factory)
            self.num_batches_tracked = torch.zeros(num_domains, dtype=torch.long, device=device)

    def _domain_index(self, domain) -> int | Tensor:
        """`domain` checked: an int, or a (1,) long tensor (range-checked in eager mode only,
        since reading the value would break a compiled graph)."""
        name, k = self.layer_name, self.num_domains
        if isinstance(domain, Tensor):
            if domain.dtype.is_floating_point or domain.dtype.is_complex or domain.dtype == torch.bool:
                raise TypeError(f"{name}: domain must be an int or an integer tensor, got a tensor "
                                f"of dtype {domain.dtype}")
            if domain.numel() != 1:
                raise ValueError(f"{name}: domain must be one index per call, got a tensor of "
                                 f"shape {tuple(domain.shape)}; split the batch by domain and "
                                 f"call the layer once per domain")
            if not torch.compiler.is_compiling() and not 0 <= int(domain) < k:
                raise IndexError(f"{name}: domain {int(domain)} is out of range for "
                                 f"num_domains={k} (expected 0 <= domain < {k})")
            return domain.reshape(1).long()
        if isinstance(domain, bool) or not isinstance(domain, int):
            raise TypeError(f"{name}: domain must be an int or an integer tensor, got "
                            f"{type(domain).__name__}")
        if not 0 <= domain < k:
            raise IndexError(f"{name}: domain {domain} is out of range for num_domains={k} "
                             f"(expected 0 <= domain < {k})")
        return domain

    def forward(self, input: Tensor, domain: int | Tensor) -> Tensor:
        self._check_input_dim(input)
        index = self._domain_index(domain)

        def row(t: Tensor) -> Tensor:
            # An int selects a view (updates write through); a tensor gathers a copy that is
            # written back below.
            return t[index] if isinstance(index, int) else t.index_select(0, index).squeeze(0)

        weight, bias = self.weight, self.bias
        if weight is not None and not self.shared_affine:
            weight, bias = row(weight), row(bias)
        running_mean, running_var = self._stats_buffers()
        if running_mean is not None:
            running_mean, running_var = row(running_mean), row(running_var)
        num_batches_tracked = self.num_batches_tracked
        if num_batches_tracked is not None:
            num_batches_tracked = row(num_batches_tracked)
        y = F.batch_norm(input, running_mean, running_var, weight, bias, self.training,
                         self.momentum, self.eps, num_batches_tracked=num_batches_tracked,
                         layer_name=self.layer_name, warn_key=self)
        if self.training and self.track_running_stats and not isinstance(index, int):
            with torch.no_grad():
                self.running_mean.index_copy_(0, index, running_mean.unsqueeze(0))
                self.running_var.index_copy_(0, index, running_var.unsqueeze(0))
                self.num_batches_tracked.index_copy_(0, index, num_batches_tracked.unsqueeze(0))
        return y

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A BatchNorm state_dict (tensors without the domain dimension) seeds every domain.
        for key, tensor in ((n, t) for n, t in list(self.named_parameters(recurse=False))
                            + list(self.named_buffers(recurse=False))):
            value = state_dict.get(prefix + key)
            if isinstance(value, Tensor) and value.ndim == tensor.ndim - 1 and \
                    value.shape == tensor.shape[1:]:
                state_dict[prefix + key] = value.unsqueeze(0).expand_as(tensor).clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, num_domains={self.num_domains}, "
                f"shared_affine={self.shared_affine}")


class DomainBatchNorm1d(DomainBatchNormBase):
    """Per-domain batch norm over (N, C) or (N, C, L) input; see the module docstring."""

    _input_ranks = (2, 3)


class DomainBatchNorm2d(DomainBatchNormBase):
    """Per-domain batch norm over (N, C, H, W) input; see the module docstring."""

    _input_ranks = (4,)


class DomainBatchNorm3d(DomainBatchNormBase):
    """Per-domain batch norm over (N, C, D, H, W) input; see the module docstring."""

    _input_ranks = (5,)
