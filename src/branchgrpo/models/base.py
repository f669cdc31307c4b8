"""The Policy protocol, as the model families see it: defined by the engine
(`branchgrpo.engine.policy`), which needs it to roll trees out, and re-exported here so a family
implements it without reaching into the engine."""

from branchgrpo.engine.policy import Cond, Policy, select_cond

__all__ = ["Cond", "Policy", "select_cond"]
