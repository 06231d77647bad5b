"""What start-up does when some models failed to load or warm up (server.on_model_failure):
stop naming each model and the reason, or serve the others and say on /readyz which are missing.

Pure; called by lifecycle.py on the event loop with what the workers reported as plain data.
"""

from __future__ import annotations

from collections.abc import Mapping


def start_failure(missing: Mapping[str, str], on_model_failure: str) -> str | None:
    """None to go on (nothing missing, or serve_others); else why start-up stops."""
    if not missing or on_model_failure == "serve_others":
        return None
    names = ", ".join(sorted(missing))
    reasons = "; ".join(missing[name] for name in sorted(missing))
    return (
        f"model(s) {names} failed to load: {reasons} "
        '(server.on_model_failure = "serve_others" serves the other models)'
    )
