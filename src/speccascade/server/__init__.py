"""``speccascade serve``: an OpenAI-compatible HTTP server over ``generate`` (issue 13).

* :mod:`.engine`: the one decode loop that owns the models (an asyncio task running ``generate``
  in a worker thread); requests are queued and decoded together as ragged batches.
* :mod:`.app`: the FastAPI routes (``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``,
  ``/health``, ``/metrics``), OpenAI-style errors, streaming, draining on SIGTERM.
* :mod:`.protocol`: the pydantic request models and response builders.
* :mod:`.calibration`: ``quality_floor`` / ``latency_budget`` -> a (method, alpha, gamma) from sweep records.
* :mod:`.metrics`: Prometheus metrics.
* :mod:`.config`: the ``serve`` subcommand's arguments (no heavy imports).

Needs the ``serve`` extra (fastapi, uvicorn, prometheus-client); ``docs/server.md`` describes it.
This module imports nothing heavy.
"""


def serve(args, load_pair) -> int:
    """``speccascade serve`` (the CLI calls this; it needs the ``serve`` extra)."""
    try:
        from .app import serve as _serve
    except ImportError as e:
        from ..errors import SpecCascadeError

        raise SpecCascadeError(f"speccascade serve needs the 'serve' extra ({e.name} is missing): "
                               "pip install 'speccascade[serve]'") from None
    return _serve(args, load_pair)
