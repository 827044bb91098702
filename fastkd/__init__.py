"""fastkd: fast knowledge-distillation trainer for image classifiers."""

__version__ = "0.1.0"
