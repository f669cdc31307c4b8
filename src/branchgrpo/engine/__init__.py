"""The engine: the algorithm's mathematics, free of any run, model family, reward or config.

``policy`` (the `Policy` protocol a generator implements), ``schedule`` (sigma grids),
``sde`` (transition kernels and their log-probabilities), ``tree`` (plans and the batched
tree-rollout engine), ``plans`` (each method's rollout plan), ``advantages`` (advantage rules),
``pruning`` (edge selection), ``losses`` (the clipped surrogate, KL, GRPO-Guard), ``methods``
(method presets pairing the above) and ``registry``.

Arrows point down only: nothing here imports the recipe (train, checkpoint, config, ...),
``models``, ``rewards`` or ``tasks`` (``tests/test_layers.py`` enforces it).
"""
