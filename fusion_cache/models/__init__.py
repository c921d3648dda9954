"""Models: teacher and pivot presets and resolving a name to weights (`presets`), GGUF conversion (`convert`),
loading a student (`load`), pruned students (`prune`) and the dtype a machine should use (`hardware`).
See docs/models.md."""
