"""Optimizers: the rotational optimizer (plain and RV AdamW, Lion, SGDM) and the builder."""

from pretrain.optim.builder import build_optimizer
from pretrain.optim.equilibrium import RULES, equilibrium_rate, rule_of
from pretrain.optim.rotational import RotationalOptimizer

__all__ = ["RULES", "RotationalOptimizer", "build_optimizer", "equilibrium_rate", "rule_of"]
