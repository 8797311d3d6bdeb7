"""The fraud-scoring reference service: `POST /authorize` answered within 20 ms.

    rtserve examples.fraud:app --bind 127.0.0.1:8080          # in-process feature store
    python -m examples.fraud --redis redis://127.0.0.1:6379/0 --bind 127.0.0.1:8080

`app` is built on first access (the model loads then), so the simulator and the trainer
import this package without a model. See examples/fraud/README.md.
"""

from __future__ import annotations

from typing import Any

_app: Any = None


def __getattr__(name: str) -> Any:
    global _app
    if name == "app":
        if _app is None:
            from .routes import create_app

            _app = create_app()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
