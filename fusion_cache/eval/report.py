"""`fusion-cache report`: a PNG of a training run's loss curves and a markdown summary table (one or several runs).

    from fusion_cache.eval.report import write_report
    write_report(["runs/kd", "runs/sft"], "runs/compare.png")  # also writes runs/compare.md; returns the table

A run directory is what `fusion-cache train` writes: ``metrics.jsonl`` (one record per optimizer step: loss, ce,
kd (the combined distillation term), one ``<loss>_<teacher>`` per teacher (e.g. ``uld_gemma3-270m``), lr,
grad_norm, answer_tokens, elapsed_s), ``train_config.json``, ``summary.json`` at the end, and ``eval.json`` once
`fusion-cache eval` ran on it. The plot has four panels (answer CE, the distillation terms, the total loss, the
learning rate), one colour per run; the table gives each run's steps, answer tokens, wall time, the first/last/min
of every logged metric, and the held-out numbers of ``eval.json`` when present. matplotlib is optional (``pip install
'fusion-cache[report]'``) and runs headless (Agg).
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
    n = len(cfg.get("shards") or [None])
    mode = "1 teacher" if n == 1 else f"{n} teachers" + (f" ({cfg['combine']})" if "combine" in cfg else "")
    kd_loss = cfg.get("kd_loss")
    return {
        "steps": last["step"],
        "planned_steps": run.summary.get("steps"),
        "answer_tokens": tokens,
        "wall_seconds": wall,
        "tokens_per_s": tokens / wall if tokens and wall else None,
        "mode": mode,
        "lambda": cfg.get("lambda", cfg.get("lambda_")),
        "kd_loss": ", ".join(kd_loss) if isinstance(kd_loss, list) else kd_loss,
    }


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
            "Held-out (eval.json):",
            "",
            "| run | answer CE (rows) | answer CE (cache) | teacher top-1 agreement | ULD | HumanEval pass@1 |",
            "|---|---|---|---|---|---|",
        ]
        for run in held:
            e = run.evaluation
            data, cache, he = e.get("data") or {}, e.get("cache") or {}, e.get("humaneval") or {}
            pass1 = "n/a" if he.get("pass@1") is None else f"{he['pass@1']:.4f} ({he['passed']}/{he['problems']})"
            lines.append(
                f"| {run.name} | {_fmt(data.get('answer_ce'))} | {_fmt(cache.get('answer_ce'))} | "
                f"{_fmt(cache.get('top1_agreement'))} | {_fmt(cache.get('uld'))} | {pass1} |"
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


def plot_runs(runs: list[Run], png: str | Path, *, dpi: int = 110) -> Path:
    """Write the four-panel PNG (CE; ULD per teacher and KL; total loss; lr) of ``runs`` to ``png``."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    (ax_ce, ax_kd), (ax_loss, ax_lr) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for i, run in enumerate(runs):
        c = colors[i % len(colors)]
        keys = run.metrics()
        ax_ce.plot(*run.series("ce"), color=c, label=run.name)
        ax_loss.plot(*run.series("loss"), color=c, label=run.name)
        ax_lr.plot(*run.series("lr"), color=c, label=run.name)
        # the distillation terms: the combined one, then each teacher's own (``<loss>_<teacher>``)
        kd = [k for k in keys if k in ("kd", *LOSSES) or k.startswith(tuple(f"{n}_" for n in LOSSES))]
        for j, key in enumerate(kd):
            ax_kd.plot(*run.series(key), color=c, linestyle=styles[j % len(styles)], label=f"{run.name}: {key}")
    for ax, title in (
        (ax_ce, "answer CE"),
        (ax_kd, "distillation terms (combined, per teacher)"),
        (ax_loss, "total loss"),
        (ax_lr, "learning rate"),
    ):
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
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
