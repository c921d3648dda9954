"""fusion-cache: multi-teacher LLM distillation from compact, shareable Top-K logit caches (InfiFusion).

Stage one (`fusion_cache.build`) runs each teacher once and stores its top-K log-probs in Arrow shards; stage two
(`fusion_cache.train`) streams them into a student with the sorted-logit ULD loss. Importing this package never
imports vLLM or Triton.
"""

__version__ = "0.1.0"
