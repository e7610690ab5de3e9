"""The one exception class of our own: a bad argument, catchable as torch.nn's would be.

torch.nn reports some bad batch-norm arguments as RuntimeError (a per-channel tensor of the wrong
size: "running_mean should contain 10 elements not 9"; tensors on different devices) and others
as ValueError (eps <= 0 in training). Our checks raise `ArgumentError`, a subclass of both, with
torch's words plus the layer's name and what to do, so code written against torch.nn, which
catches either, catches ours, and code that follows our documentation's ValueError does too.
"""

from __future__ import annotations

__all__ = ["ArgumentError"]


class ArgumentError(ValueError, RuntimeError):
    """A bad argument to a batch-norm layer or function; both a ValueError and a RuntimeError.

        >>> import torch, batchnorm
        >>> try:
        ...     batchnorm.functional.batch_norm(torch.randn(2, 10), torch.zeros(9), torch.ones(10))
        ... except RuntimeError as error:  # what torch.nn.functional.batch_norm raises here
        ...     print(isinstance(error, ValueError), str(error)[:57])
        True batch_norm: running_mean should contain 10 elements not 9
    """
