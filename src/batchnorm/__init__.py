"""batchnorm: fast, complete and trustworthy batch normalization for PyTorch."""

__version__ = "0.1.0"
