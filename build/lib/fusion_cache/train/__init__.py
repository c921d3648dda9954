"""Stage two, for any number S >= 1 of teachers: caches joined on sample_id (`join`), rendered and aligned for the
student (`stream`, `align`), collated (`batch`) with each teacher's combine weights (`weights`), scored by each
teacher's own distillation loss (`losses`) in one objective (`objective`), trained (`trainer`) with exact resume
(`checkpoint`) and data parallelism (`distributed`). See docs/training.md and docs/fusion.md."""
