"""Merging pairwise-fused pivots: methods on tensors (`methods`), streaming safetensors I/O (`io`), the merge run
(`run`), its settings (`config`) and train-per-teacher-then-merge (`pairwise`). See docs/merge.md."""
