"""Merging pairwise-fused pivots: the methods as registered units (`registry`: names, options, defaults), their
kernels on tensors (`methods`), streaming safetensors I/O (`io`), the merge run (`run`) and its settings (`config`);
train-per-teacher-then-merge is `fusion_cache.recipes.pairwise`. See docs/merge.md."""
