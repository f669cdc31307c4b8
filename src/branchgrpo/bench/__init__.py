"""Benchmarks: a tool over the recipe, run by ``branchgrpo bench <name>``.

``nfe`` (forwards, edges, trained edges per method), ``rollout`` (batched engine vs per-node and
sequential evaluation), ``iteration`` (`branchgrpo.train.iteration` timed per method),
``learn`` (held-out judge vs training seconds, through `branchgrpo.train.train`), ``credit``
(how much of each trained edge's advantage its own action earned); ``common``: what they
share. Each module's ``command(args)`` is what the CLI dispatches to; nothing below the CLI
imports this package.
"""
