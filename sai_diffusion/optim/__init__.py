"""Optimizers: SGD-SaI and the factory. Depends on torch alone (peft only for scaled-*)."""

from .factory import OPTIMIZERS, build_optimizer
from .sgd_sai import SGDSaI, gsnr_table

__all__ = ["OPTIMIZERS", "SGDSaI", "build_optimizer", "gsnr_table"]
