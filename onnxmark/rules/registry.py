"""Registry of transposition rules: each rule module registers the ONNX operators it inverts."""
from __future__ import annotations

from typing import Callable

_RULES: dict[tuple[str, str], Callable] = {}


def register(*op_types: str, domain: str = "") -> Callable:
    """Register a planning function for the given op types of the default (or a named) ONNX domain.

    The planning function takes (node, graph) and returns a Step, or raises Unsupported with the reason.
    """
    def decorate(plan_function: Callable) -> Callable:
        for op_type in op_types:
            key = (domain, op_type)
            if key in _RULES:
                raise ValueError(f"A transposition rule for {op_type} is already registered")
            _RULES[key] = plan_function
        return plan_function

    return decorate


def rule_for(op_type: str, domain: str = "") -> Callable | None:
    _load_rule_modules()
    return _RULES.get(("" if domain == "ai.onnx" else domain, op_type))


def supported_op_types() -> list[str]:
    _load_rule_modules()
    return sorted(op for _, op in _RULES)


def _load_rule_modules() -> None:
    # Importing the modules runs their @register decorators.
    from onnxmark.rules import (  # noqa: F401
        activation, conv, elementwise, linear, normalization, padding, pooling, resize, shape,
    )
