"""No final protocol: the demo reports nothing beyond the runner's evaluations (``metaopt demo`` has its table)."""
