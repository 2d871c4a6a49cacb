"""Counting the ONNX Runtime sessions a statistics pass keeps alive."""

from __future__ import annotations

import weakref


def track_tap_sessions(monkeypatch) -> list[int]:
    """Patch ``IntermediateReader``'s sessions; the returned list gets, at each session's creation, how many
    sessions it made before are still alive."""
    from accullm_export.runtime import intermediates

    made: list[weakref.ref] = []
    alive_at_creation: list[int] = []
    original = intermediates.IntermediateReader._session

    def tracked(self, model):
        alive_at_creation.append(sum(ref() is not None for ref in made))
        session = original(self, model)
        made.append(weakref.ref(session))
        return session

    monkeypatch.setattr(intermediates.IntermediateReader, "_session", tracked)
    return alive_at_creation
