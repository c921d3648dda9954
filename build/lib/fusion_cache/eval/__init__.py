"""Evaluation: held-out answer CE, top-1 agreement and ULD against teacher caches (`evaluate`), HumanEval in a
sandbox (`humaneval`, `sandbox`), and run reports with loss curves (`report`). See docs/eval.md."""
