"""Evaluation: held-out answer CE, top-1 agreement and ULD against teacher caches (`evaluate`), HumanEval in a
sandbox (`humaneval`, `sandbox`), and run reports with loss curves (`report`). See docs/eval.md."""

# How a HumanEval problem is put to the model (`humaneval`): the raw prompt continued, or a chat turn. Here, light to
# import, because the command line's choices read it.
PROMPT_STYLES = ("raw", "chat")
