"""The evaluation report a model card can use: report.md (a table of every task) and scores.png (a bar chart).

    write_report("eval/", report, model="runs/smol-sft", baseline=base_report, baseline_name="runs/smol")

The table: task, n, metric, score, stderr (the harness's), chance, and with a baseline its score and stderr beside
and the difference; the MMLU subjects follow in a table of their own. The chart: the top-level tasks' scores with
their stderr as error bars, the baseline's bars beside, chance as a tick. Both files are written atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ownllm.benchmarks.results import BenchmarkReport, TaskResult
from ownllm.outputs import atomic_file, temporary_path

REPORT_FILE = "report.md"
CHART_FILE = "scores.png"


def _row(result: TaskResult, baseline: TaskResult | None, with_baseline: bool) -> str:
    metric, score, stderr = result.headline
    cells = [result.task, str(result.n), metric, f"{100 * score:.2f}", f"{100 * stderr:.2f}",
             f"{100 * result.chance:.2f}"]
    if with_baseline:
        if baseline is None:
            cells += ["-", "-", "-"]
        else:
            _, base, base_stderr = baseline.headline
            cells += [f"{100 * base:.2f}", f"{100 * base_stderr:.2f}", f"{100 * (score - base):+.2f}"]
    return "| " + " | ".join(cells) + " |"


def _table(results: Sequence[TaskResult], baseline: dict[str, TaskResult] | None) -> list[str]:
    header = ["task", "n", "metric", "score", "stderr", "chance"]
    if baseline is not None:
        header += ["baseline", "baseline stderr", "difference"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    return lines + [_row(r, (baseline or {}).get(r.task), baseline is not None) for r in results]


def markdown(report: BenchmarkReport, model: str, baseline: BenchmarkReport | None = None,
             baseline_name: str | None = None) -> str:
    """report.md's text."""
    base = {t.task: t for t in baseline.tasks} if baseline is not None else None
    shots = "/".join(str(s) for s in sorted({t.shots for t in report.tasks}))
    lines = [f"# Evaluation of {model}", "",
             f"Scores in percent ({shots}-shot); stderr is the standard error of the mean as lm-evaluation-harness "
             "computes it; chance is the score of a uniform guess."]
    if baseline is not None:
        lines.append(f"Baseline: {baseline_name}; difference = score - baseline.")
    lines += ["", *_table(report.top_level, base), "",
              f"CORE-style score (accuracy centred on chance, mean of {len(report.top_level)} tasks): "
              f"{report.core:.4f}" + (f" (baseline {baseline.core:.4f})" if baseline is not None else "")]
    grouped = [t for t in report.tasks if t.group is not None]
    if grouped:
        lines += ["", "## Groups in detail (subjects and the unweighted mean over them)", "", *_table(grouped, base)]
    lines += ["", f"![scores]({CHART_FILE})", ""]
    return "\n".join(lines)


def _error_bars(results: Sequence[TaskResult]) -> list[list[float]]:
    """stderr below and above each score, in percent, the lower bar stopping at 0."""
    return [[100 * min(t.headline[2], t.headline[1]) for t in results], [100 * t.headline[2] for t in results]]


def plot(report: BenchmarkReport, path: Path, model: str, baseline: BenchmarkReport | None = None,
         baseline_name: str | None = None) -> None:
    """A bar per top-level task (error bars: stderr), the baseline's beside it, chance as a black tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = report.top_level
    base = {t.task: t for t in baseline.tasks} if baseline is not None else {}
    width = 0.4 if baseline is not None else 0.7
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(tasks) + 2), 4))
    xs = list(range(len(tasks)))
    shift = -width / 2 if baseline is not None else 0.0
    ax.bar([x + shift for x in xs], [100 * t.headline[1] for t in tasks], width, yerr=_error_bars(tasks), capsize=3,
           label=model)
    if baseline is not None:
        pairs = [(x, base[t.task]) for x, t in zip(xs, tasks) if t.task in base]
        ax.bar([x + width / 2 for x, _ in pairs], [100 * b.headline[1] for _, b in pairs], width,
               yerr=_error_bars([b for _, b in pairs]), capsize=3, label=baseline_name)
    ax.scatter(xs, [100 * t.chance for t in tasks], marker="_", s=400, color="black", label="chance", zorder=3)
    ax.set_xticks(xs, [f"{t.task}\n({t.headline[0]})" for t in tasks], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = temporary_path(path.with_suffix(".tmp.png"))
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    tmp.replace(path)


def write_report(folder: str | Path, report: BenchmarkReport, model: str, baseline: BenchmarkReport | None = None,
                 baseline_name: str | None = None) -> Path:
    """folder/report.md and folder/scores.png; returns the report's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plot(report, folder / CHART_FILE, model, baseline, baseline_name)
    with atomic_file(folder / REPORT_FILE) as handle:
        handle.write(markdown(report, model, baseline, baseline_name))
    return folder / REPORT_FILE
