"""Regenerate the embedded teacher's bundled answers to the demo prompts (sampled, with vLLM).

    .venv/bin/python scripts/make_demo_responses.py [--max-tokens 128] [--temperature 0.8] [--seed 0]

Writes fusion_cache/data/demo_responses.jsonl and demo_responses.meta.json. `fusion-cache demo` uses them when
the teacher revision, the length limit and the dtype match, and generates fresh answers otherwise.
"""

from __future__ import annotations

import argparse

from transformers import AutoTokenizer

from fusion_cache.capture.engines import make_engine
from fusion_cache.models.hardware import default_dtype
from fusion_cache.models.presets import resolve_model
from fusion_cache.recipes.demo_data import generate_responses
from fusion_cache.recipes.demo_data import generation_settings
from fusion_cache.recipes.demo_data import load_demo_prompts
from fusion_cache.recipes.demo_data import write_bundled_responses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    teacher = resolve_model("smollm2-135m")
    dtype = default_dtype()
    engine = make_engine("vllm", teacher.path, dtype=dtype, max_model_len=2048)
    try:
        responses = generate_responses(
            engine,
            AutoTokenizer.from_pretrained(teacher.path),
            load_demo_prompts(),
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            seed=args.seed,
        )
    finally:
        engine.close()
    path = write_bundled_responses(
        responses,
        generation_settings(teacher.revision, args.max_tokens, dtype, temperature=args.temperature, seed=args.seed),
    )
    print(f"wrote {len(responses)} answers to {path}")


if __name__ == "__main__":
    main()
