"""``python -m server.distill``: offline distillation from a run's artifacts (the engine is
``common.distill``)."""
