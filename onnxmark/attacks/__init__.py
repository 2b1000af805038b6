"""Attacks on watermarked models: each writes a valid ONNX file that a suspect could have made.

Importing this package registers every attack kind in `ATTACKS`. Training attacks import torch only when
they run.
"""
from onnxmark.attacks import finetune, prune, quantize, removal, rewrite  # noqa: F401  (register the kinds)
from onnxmark.attacks.base import ATTACKS, AttackOptions, attack_kind, attacked_model, run_attack

__all__ = ["ATTACKS", "AttackOptions", "attack_kind", "attacked_model", "run_attack"]
