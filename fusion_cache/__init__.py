"""fusion-cache: multi-teacher LLM distillation from compact, shareable Top-K logit caches (InfiFusion).

Stage one (`fusion_cache.capture`) runs each teacher once and stores its top-K log-probs in Arrow shards
(`fusion_cache.cache`); stage two (`fusion_cache.train`) streams them into a student. Importing this package never
imports vLLM or Triton.
"""

__version__ = "0.1.0"
