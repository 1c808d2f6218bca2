"""Reviewing results: the review page of a change, the freshness check, sharing experiments."""
