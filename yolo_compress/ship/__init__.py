"""Shipping: the exported files and the summary report."""
