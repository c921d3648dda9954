"""Whole programs built from the stages: the end-to-end demo (`demo`, `demo_data`) and pairwise fusion, one run per
teacher then a merge (`pairwise`)."""
