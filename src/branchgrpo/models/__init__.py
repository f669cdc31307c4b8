"""Policies: the generators we train (see `base.Policy`)."""
