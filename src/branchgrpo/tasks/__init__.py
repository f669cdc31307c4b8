"""Embedded tasks that need no download."""
