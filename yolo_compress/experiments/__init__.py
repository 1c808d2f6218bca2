"""Experiment tools over DVC experiments (the study, loss comparisons, overhead timing). They import the core;
the core never imports them."""
