"""Validation against the full-precision reference: LLM metrics, Polygraphy comparisons, bisection, reports."""
