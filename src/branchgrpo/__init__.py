"""branchgrpo: online RL for flow-matching generators with branching rollout trees."""

__version__ = "0.1.0"
