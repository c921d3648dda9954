"""Stage one: input rows (`inputs`) rendered with each teacher's template (`render`), scored once by a teacher
engine (`engines`: vLLM or transformers), written as a cache (`build`; `ray` for many parts, `generate` for answers
written by a model first). See docs/capture.md."""
