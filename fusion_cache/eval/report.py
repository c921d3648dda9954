"""`fusion-cache report`: a PNG of a training run's loss curves and a markdown summary table (one or several runs).

    from fusion_cache.eval.report import write_report
    write_report(["runs/kd", "runs/sft"], "runs/compare.png")  # also writes runs/compare.md; returns the table

A run directory is what `fusion-cache train` writes: ``metrics.jsonl`` (one record per optimizer step: loss, ce,
kd (the combined distillation term), one ``<loss>_<teacher>`` per teacher (e.g. ``uld_gemma3-270m``), lr,
grad_norm, answer_tokens, elapsed_s), ``train_config.json``, ``summary.json`` at the end, and ``eval.json`` once
`fusion-cache eval` ran on it. The plot has six panels (answer CE per token and per byte, the distillation terms,
the total loss, the learning rate, the gradient norm) over integer optimizer steps, one colour per run, with each
run's held-out answer CE (``eval.json``) marked at its last step. Per-token CE depends on the student's tokenizer, so
the per-byte panel is the one to compare students of different tokenizers on. The total loss mixes CE and KD by
lambda and each loss's own scale, so it is drawn only for the runs with the first run's objective (the others are
named in the panel's title). The table gives each run's objective (``SFT`` for lambda 0, else the loss each teacher
trained with), steps, answer tokens, wall time, the first/last/min of every logged metric, and the held-out numbers
of ``eval.json`` when present. matplotlib is optional (``pip install 'fusion-cache[report]'``) and runs headless
(Agg).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from fusion_cache.errors import ConfigError
from fusion_cache.train.losses import LOSSES

# Record fields that are positions on the x axis or counters, not metrics to summarize.
_NOT_METRICS = ("step", "answer_tokens", "elapsed_s")


@dataclass
class Run:
    """One training run as read from its directory.

    Attributes:
        name: the label in the plot and tables (the directory name, made unique among the runs).
        path: the run directory.
        records: the metrics.jsonl records, in step order.
        config: train_config.json ({} when missing).
        summary: summary.json ({} while the run has not finished).
        evaluation: eval.json ({} when `fusion-cache eval` has not written one).
    """

    name: str
    path: Path
    records: list[dict]
    config: dict
    summary: dict
    evaluation: dict

    def metrics(self) -> list[str]:
        """The numeric metrics logged, in first-seen order (uld_<teacher> included)."""
        keys: dict[str, None] = {}
        for r in self.records:
            for k, v in r.items():
                if k not in _NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool):
                    keys.setdefault(k)
        return list(keys)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of ``key`` over the records that have it."""
        pts = [(r["step"], float(r[key])) for r in self.records if isinstance(r.get(key), (int, float))]
        return [s for s, _ in pts], [v for _, v in pts]


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e


def load_run(path: str | Path, name: str | None = None) -> Run:
    """Read a run directory (see the module docstring).

    Raises:
        ConfigError: no metrics.jsonl, a malformed line (named), or no records.
    """
    p = Path(path)
    metrics = p / "metrics.jsonl"
    if not metrics.exists():
        raise ConfigError(f"run: {p} has no metrics.jsonl (not a `fusion-cache train` run directory)")
    records = []
    lines = metrics.read_text().splitlines()
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            # a run killed mid-write leaves a partial last line; anything earlier is damage
            if i == len(lines):
                break
            raise ConfigError(f"{metrics}: line {i} is not valid JSON: {line[:80]!r}") from None
        if not isinstance(rec, dict) or "step" not in rec:
            raise ConfigError(f"{metrics}: line {i} has no 'step' field: {line[:80]!r}")
        records.append(rec)
    if not records:
        raise ConfigError(f"{metrics}: no metrics records yet")
    records.sort(key=lambda r: r["step"])
    return Run(
        name or p.resolve().name,
        p,
        records,
        _read_json(p / "train_config.json"),
        _read_json(p / "summary.json"),
        _read_json(p / "eval.json"),
    )


def load_runs(paths: list[str | Path]) -> list[Run]:
    """Read several runs; labels are the directory names, with the parent prepended where two are equal."""
    if not paths:
        raise ConfigError("report: give at least one run directory")
    names = [Path(p).resolve().name for p in paths]
    labels = [
        f"{Path(p).resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names, strict=True)
    ]
    if len(set(labels)) < len(labels):
        labels = [str(p) for p in paths]
    return [load_run(p, label) for p, label in zip(paths, labels, strict=True)]


# ------------------------------------------------------------------------------------------- table
def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


def run_overview(run: Run) -> dict:
    """Steps, answer tokens, wall time and tokens/s of a run (summary.json when finished, else the last record)."""
    last = run.records[-1]
    wall = run.summary.get("wall_seconds", last.get("elapsed_s"))
    tokens = last.get("answer_tokens")
    cfg = run.config
    n = len(_caches(cfg) or [None])
    mode = "1 teacher" if n == 1 else f"{n} teachers" + (f" ({cfg['combine']})" if "combine" in cfg else "")
    return {
        "steps": last["step"],
        "planned_steps": run.summary.get("steps"),
        "answer_tokens": tokens,
        "wall_seconds": wall,
        "tokens_per_s": tokens / wall if tokens and wall else None,
        "mode": mode,
        "lambda": _lambda(cfg),
        "kd_loss": loss_label(run),
    }


def _caches(cfg: dict) -> list | None:
    return cfg.get("cache", cfg.get("shards"))  # `cache` since the flags were unified; `shards` before


def _lambda(cfg: dict) -> float | None:
    return cfg.get("lambda", cfg.get("lambda_"))


def loss_label(run: Run) -> str | None:
    """What the run distilled with: ``none (SFT)`` at lambda 0 (no teacher term is trained), else each teacher's loss
    as trained (``auto`` resolved, from summary.json), else the configured ``kd_loss``."""
    if _lambda(run.config) == 0:
        return "none (SFT)"
    resolved = run.summary.get("kd_loss")
    if isinstance(resolved, dict) and resolved:
        return ", ".join(resolved.values())
    kd_loss = run.config.get("kd_loss")
    return ", ".join(kd_loss) if isinstance(kd_loss, list) else kd_loss


# What decides the total loss's scale: two runs' totals are comparable only when all of these agree.
_OBJECTIVE_FIELDS = ("lambda", "kd_loss", "loss_k", "top_k", "zscore", "softmax", "temperature", "tail", "combine")


def objective(run: Run) -> tuple:
    """The run's objective: lambda and, when lambda > 0, the losses and their settings."""
    lam = _lambda(run.config)
    if lam == 0:
        return (0,)
    cfg = run.config
    return (lam, loss_label(run), *(repr(cfg.get(k)) for k in _OBJECTIVE_FIELDS[2:]))


def metric_stats(run: Run) -> dict[str, dict]:
    """{metric: {"first", "last", "min", "min_step"}} over the run's records (non-finite values skipped)."""
    out = {}
    for key in run.metrics():
        steps, values = run.series(key)
        finite = [(s, v) for s, v in zip(steps, values, strict=True) if math.isfinite(v)]
        if not finite:
            continue
        s_min, v_min = min(finite, key=lambda t: t[1])
        out[key] = {"first": values[0], "last": values[-1], "min": v_min, "min_step": s_min}
    return out


def report_table(runs: list[Run]) -> str:
    """The markdown summary: one overview row per run, the metrics' first/last/min, held-out numbers if any."""
    lines = [
        "| run | mode | lambda | kd loss | steps | answer tokens | wall time | answer tokens/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        o = run_overview(run)
        steps = f"{o['steps']}" + (f" of {o['planned_steps']}" if o["planned_steps"] not in (None, o["steps"]) else "")
        wall = "n/a" if o["wall_seconds"] is None else f"{o['wall_seconds']:.1f} s"
        tps = "n/a" if o["tokens_per_s"] is None else f"{o['tokens_per_s']:.1f}"
        lam = "n/a" if o["lambda"] is None else f"{o['lambda']:g}"
        lines.append(
            f"| {run.name} | {o['mode']} | {lam} | {o['kd_loss'] or 'n/a'} | {steps} | "
            f"{_fmt(o['answer_tokens'])} | {wall} | {tps} |"
        )
    lines += ["", "| run | metric | first | last | min (step) |", "|---|---|---|---|---|"]
    for run in runs:
        for key, s in metric_stats(run).items():
            lines.append(
                f"| {run.name} | {key} | {_fmt(s['first'])} | {_fmt(s['last'])} | {_fmt(s['min'])} ({s['min_step']}) |"
            )
    held = [run for run in runs if run.evaluation]
    if held:
        lines += [
            "",
            "Held-out (eval.json); CE in nats per answer token and per answer byte (bytes: across tokenizers):",
            "",
            "| run | answer CE (rows) | per byte (rows) | answer CE (cache) | per byte (cache) "
            "| teacher top-1 agreement | ULD | HumanEval pass@1 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for run in held:
            e = run.evaluation
            data, cache, he = e.get("data") or {}, e.get("cache") or {}, e.get("humaneval") or {}
            pass1 = "n/a" if he.get("pass@1") is None else f"{he['pass@1']:.4f} ({he['passed']}/{he['problems']})"
            uld = cache.get("uld")
            uld = ", ".join(f"{k} {_fmt(v)}" for k, v in uld.items()) if isinstance(uld, dict) else _fmt(uld)
            lines.append(
                f"| {run.name} | {_fmt(data.get('answer_ce'))} | {_fmt(data.get('answer_ce_per_byte'))} | "
                f"{_fmt(cache.get('answer_ce'))} | {_fmt(cache.get('answer_ce_per_byte'))} | "
                f"{_fmt(cache.get('top1_agreement'))} | {uld} | {pass1} |"
            )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- plot
def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("`fusion-cache report` draws with matplotlib: pip install 'fusion-cache[report]'") from e
    matplotlib.use("Agg")  # headless: no display on training machines
    import matplotlib.pyplot as plt

    return plt


def _held_out(run: Run, key: str) -> float | None:
    """The run's held-out ``key`` (answer_ce, answer_ce_per_byte) from eval.json: the cache's, else the rows'."""
    for part in ("cache", "data"):
        v = (run.evaluation.get(part) or {}).get(key)
        if isinstance(v, (int, float)):
            return float(v)
    return None


def plot_runs(runs: list[Run], png: str | Path, *, dpi: int = 110) -> Path:
    """Write the six-panel PNG (CE per token and per byte; the distillation terms; total loss; lr; grad norm) of
    ``runs`` to ``png`` (see the module docstring)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 3, figsize=(16, 8), sharex=True)
    (ax_ce, ax_byte, ax_kd), (ax_loss, ax_lr, ax_grad) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    same = [r for r in runs if objective(r) == objective(runs[0])]  # totals are comparable within one objective
    for i, run in enumerate(runs):
        c = colors[i % len(colors)]
        keys = run.metrics()
        label = f"{run.name} ({loss_label(run) or 'n/a'})"
        ax_ce.plot(*run.series("ce"), color=c, label=label)
        ax_byte.plot(*run.series("ce_per_byte"), color=c, label=label)
        ax_lr.plot(*run.series("lr"), color=c, label=run.name)
        ax_grad.plot(*run.series("grad_norm"), color=c, label=run.name)
        if run in same:
            ax_loss.plot(*run.series("loss"), color=c, label=label)
        # the distillation terms: the combined one, then each teacher's own (``<loss>_<teacher>``); none for SFT
        kd = [k for k in keys if k in ("kd", *LOSSES) or k.startswith(tuple(f"{n}_" for n in LOSSES))]
        for j, key in enumerate(kd if objective(run) != (0,) else []):
            ax_kd.plot(*run.series(key), color=c, linestyle=styles[j % len(styles)], label=f"{run.name}: {key}")
        last = run.records[-1]["step"]
        for ax, key in ((ax_ce, "answer_ce"), (ax_byte, "answer_ce_per_byte")):
            v = _held_out(run, key)
            if v is not None:
                ax.plot([last], [v], marker="*", markersize=12, color=c, linestyle="none",
                        label=f"{run.name}: held-out")  # fmt: skip
    others = [r.name for r in runs if r not in same]
    loss_title = "total loss" + (f" (other objectives not drawn: {', '.join(others)})" if others else "")
    for ax, title, ylabel in (
        (ax_ce, "answer CE per token (star: held-out)", "nats / answer token"),
        (ax_byte, "answer CE per byte (star: held-out)", "nats / answer byte"),
        (ax_kd, "distillation terms (combined, per teacher)", "loss"),
        (ax_loss, loss_title, "(1 - lambda) CE + lambda KD"),
        (ax_lr, "learning rate", "lr"),
        (ax_grad, "gradient norm (before clipping)", "L2 norm"),
    ):
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # optimizer steps are whole numbers
        if ax.lines:
            ax.legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    fig.suptitle("fusion-cache training: " + ", ".join(r.name for r in runs), fontsize=10)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=dpi)
    plt.close(fig)
    return png


def default_output(paths: list[str | Path]) -> Path:
    """One run: ``<run>/report.png``; several: ``report.png`` in their common parent directory."""
    if len(paths) == 1:
        return Path(paths[0]) / "report.png"
    return Path(os.path.commonpath([Path(p).resolve() for p in paths])) / "report.png"


def write_report(paths: list[str | Path], png: str | Path | None = None) -> tuple[Path, Path, str]:
    """Plot and tabulate the runs; the table goes next to the PNG as ``.md``.

    Returns:
        (png path, markdown path, the table).
    """
    runs = load_runs(paths)
    png = Path(png) if png is not None else default_output(paths)
    table = report_table(runs)
    plot_runs(runs, png)
    md = png.with_suffix(".md")
    md.write_text("# Training report\n\n" + "\n".join(f"- {r.name}: `{r.path}`" for r in runs) + "\n\n" + table + "\n")
    return png, md, table
