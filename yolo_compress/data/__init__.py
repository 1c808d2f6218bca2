"""The dataset phase: the built-in generators, your own dataset, and the prepared layout every stage reads."""
