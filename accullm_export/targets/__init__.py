"""Deployment targets: what each device can run, and how fast a decode step can possibly be there."""

from accullm_export.targets.registry import TARGETS, TargetProfile, get_target

__all__ = ["TARGETS", "TargetProfile", "get_target"]
