"""`edgelearn report`: one self-contained HTML file comparing runs (no network, no script).

Curves are inline SVG drawn here from each run's `metrics.jsonl` (stdlib + numpy only, so a
device needs no plotting library): training loss and held-out score against steps and
against forwards, every run overlaid in its own colour. A table gives each run's settings
(`session.json`, the journal header), held-out score before / after, step time and memory.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from edgelearn.errors import EdgelearnError, InputError
from edgelearn.journal import iter_journal
from edgelearn.osutil import atomic_write_bytes
from edgelearn.svgplot import Series, decimate, line_chart
from edgelearn.training.metrics import read_metrics
from edgelearn.training.rundir import JOURNAL, METRICS, SESSION

#: run colours (colour-blind-safe Okabe-Ito order)
COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
#: points drawn per curve at most (longer runs are decimated: the file stays small)
MAX_POINTS = 500


# -- reading runs ---------------------------------------------------------------------------
def load_run(run_dir: str | os.PathLike, name: str | None = None) -> dict[str, Any]:
    """A run's curves and settings, for `write_report`.

    Args:
        run_dir: a run directory holding `metrics.jsonl` (written by `train` / the demo).
        name: its label in the report (default: the directory's name).
    Raises: InputError when the directory holds no metrics.
    """
    d = Path(run_dir)
    if not (d / METRICS).is_file():
        why = "no such directory" if not d.is_dir() else f"it has no {METRICS}"
        raise InputError(f"{run_dir}: not a run to report on ({why}; runs written by "
                         "`edgelearn train` or `edgelearn demo` have one)")
    lines = read_metrics(d / METRICS)
    steps = [ln for ln in lines if ln.get("kind") != "end" and "forwards" in ln]
    evals = [ln for ln in lines if ln.get("kind") != "end" and "eval_loss" in ln]
    end = next((ln for ln in reversed(lines) if ln.get("kind") == "end"), {})
    last = steps[-1] if steps else {}
    return {
        "name": name or d.name, "path": str(d), "settings": _settings(d),
        "step": [ln["step"] for ln in steps], "forwards": [ln["forwards"] for ln in steps],
        "loss": [_f(ln.get("loss")) for ln in steps],
        "eval_step": [ln["step"] for ln in evals],
        "eval_forwards": [ln.get("forwards", 0) for ln in evals],
        "eval_loss": [_f(ln.get("eval_loss")) for ln in evals],
        "eval_accuracy": [_f(ln.get("eval_accuracy")) for ln in evals],
        "steps": last.get("step", 0), "total_forwards": last.get("forwards", 0),
        "accepted": last.get("accepted"), "rejected": last.get("rejected"),
        "rollbacks": last.get("rollbacks"), "end": end,
    }


def _f(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _settings(d: Path) -> dict[str, Any]:
    """What the run trained with: session.json's train config, else the journal header."""
    out: dict[str, Any] = {}
    try:
        record = json.loads((d / SESSION).read_text())
        train = record.get("train", {})
        out = {k: train.get(k) for k in ("optimizer", "trainable", "batch_size", "seed",
                                         "objective")}
        out["options"] = {k: v for k, v in (train.get("options") or {}).items()
                          if v is not None}
        out["bundle"] = record.get("bundle")
    except (OSError, ValueError, AttributeError):
        pass
    try:
        header = next(iter_journal(d / JOURNAL, max_records=1), None) or {}
    except (EdgelearnError, OSError, ValueError):  # damaged: the report shows what it can
        header = {}
    for key in ("optimizer", "objective", "n_trainable", "n_examples", "batch_size"):
        if header.get(key) is not None and out.get(key) is None:
            out[key] = header[key]
    return out


# -- summaries ------------------------------------------------------------------------------
def summarize(run: dict[str, Any]) -> dict[str, Any]:
    """The `report --json` entry of a run: path, name, steps, before/after scores, timing."""
    acc, eloss = run["eval_accuracy"], run["eval_loss"]
    before = 0 in run["eval_step"][:1]
    end = run["end"]
    return {
        "name": run["name"], "path": run["path"], "optimizer": run["settings"].get("optimizer"),
        "steps": run["steps"], "forwards": run["total_forwards"],
        "accepted": run["accepted"], "rejected": run["rejected"], "rollbacks": run["rollbacks"],
        "accuracy_before": _json(acc[0]) if before and acc else None,
        "accuracy_after": _json(acc[-1]) if acc and run["eval_step"][-1] > 0 else None,
        "eval_loss_before": _json(eloss[0]) if before and eloss else None,
        "eval_loss_after": _json(eloss[-1]) if eloss and run["eval_step"][-1] > 0 else None,
        "loss_last": _json(_tail_mean(run["loss"])),
        "step_ms_median": end.get("step_ms_median"),
        "forward_ms_median": end.get("forward_ms_median"),
        "peak_rss_mb": end.get("peak_rss_mb"),
    }


def _json(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _tail_mean(values: list[float]) -> float:
    """Mean of the finite losses of the last 5% of steps (at least 1): one batch is noisy."""
    a = np.asarray(values[-max(1, len(values) // 20):], np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else math.nan


def smooth(y: list[float], window: int) -> np.ndarray:
    """Trailing mean over `window` points, ignoring non-finite values (NaN where none)."""
    a = np.asarray(y, np.float64)
    ok = np.isfinite(a)
    c = np.concatenate([[0.0], np.cumsum(np.where(ok, a, 0.0))])
    n = np.concatenate([[0], np.cumsum(ok)])
    idx = np.arange(1, a.size + 1)
    lo = np.maximum(idx - window, 0)
    cnt = n[idx] - n[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, (c[idx] - c[lo]) / np.maximum(cnt, 1), np.nan)


# -- charts ---------------------------------------------------------------------------------
def charts(runs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(title, svg) of every curve: training loss, then held-out scores (when any run has
    them), each against steps and against forwards."""
    out = []
    for axis, label in (("step", "steps"), ("forwards", "forwards (loss evaluations)")):
        series = []
        for i, run in enumerate(runs):
            series += _loss_series(run, axis, COLOURS[i % len(COLOURS)])
        out.append((f"Training loss vs {axis}", line_chart(
            series, title=f"Training loss vs {axis} (faint: per batch; line: mean)",
            xlabel=label, ylabel="loss")))
    for key, what in (("eval_accuracy", "Held-out accuracy"), ("eval_loss", "Held-out loss")):
        if not any(np.isfinite(run[key]).any() for run in runs if run[key]):
            continue
        for axis, label in (("step", "steps"), ("forwards", "forwards (loss evaluations)")):
            series = [Series(run["name"], COLOURS[i % len(COLOURS)],
                             np.asarray(run[f"eval_{axis}"], np.float64),
                             np.asarray(run[key], np.float64), markers=True)
                      for i, run in enumerate(runs) if run[key]]
            out.append((f"{what} vs {axis}", line_chart(
                series, title=f"{what} vs {axis}", xlabel=label, ylabel=what.lower())))
    return out


def _loss_series(run: dict[str, Any], axis: str, colour: str) -> list[Series]:
    """A run's per-batch loss (faint) and its trailing mean (solid) against `axis`."""
    if not run["loss"]:
        return []
    x = np.asarray(run[axis], np.float64)
    raw = np.asarray(run["loss"], np.float64)
    mean = smooth(run["loss"], max(1, len(raw) // 30))
    return [Series(run["name"], colour, *decimate(x, raw, MAX_POINTS), faint=True),
            Series(run["name"], colour, *decimate(x, mean, MAX_POINTS))]


# -- the page -------------------------------------------------------------------------------
CSS = """body{font:14px system-ui,sans-serif;margin:24px;color:#222;max-width:1180px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}
.grid{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;border:1px solid #ddd;border-radius:4px;padding:4px;background:#fff}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right;vertical-align:top}th{background:#f3f3f3}td.l,th.l{text-align:left}
code{font-size:12px;white-space:pre-wrap;word-break:break-all}
svg .t{font-size:13px;font-weight:600}svg .g{stroke:#eee}svg .frame{fill:none;stroke:#999}
svg .xl{font-size:11px;text-anchor:middle;fill:#444}svg .yl{font-size:11px;
text-anchor:end;fill:#444}svg .lt{font-size:11px}
td.n{white-space:nowrap}"""


def _cell(v: Any, fmt: str = "{:.3f}") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return fmt.format(v) if isinstance(v, float) else html.escape(str(v))


def _table(runs: list[dict[str, Any]], summaries: list[dict[str, Any]]) -> str:
    """Per run: steps, forwards, accepted / rejected / rollbacks, scores, timing, memory."""
    head = ("run", "optimizer", "steps", "forwards", "accepted / rejected", "rollbacks",
            "held-out acc before", "held-out acc after", "held-out loss before",
            "held-out loss after", "train loss (last 5%)", "step ms (median)",
            "forward ms (median)", "peak RSS MB")
    rows = ["<tr>" + "".join(f'<th class="{"l" if i < 2 else ""}">{h}</th>'
                             for i, h in enumerate(head)) + "</tr>"]
    for i, (run, s) in enumerate(zip(runs, summaries, strict=True)):
        colour = COLOURS[i % len(COLOURS)]
        cells = [f'<td class="l n"><span style="color:{colour}">&#9632;</span> '
                 f'{html.escape(run["name"])}</td>',
                 f'<td class="l">{_cell(s["optimizer"])}</td>']
        cells += [f"<td>{_cell(s[k])}</td>" for k in ("steps", "forwards")]
        cells.append(f"<td>{_cell(s['accepted'])} / {_cell(s['rejected'])}</td>")
        cells.append(f"<td>{_cell(s['rollbacks'])}</td>")
        cells += [f"<td>{_cell(s[k])}</td>" for k in (
            "accuracy_before", "accuracy_after", "eval_loss_before", "eval_loss_after",
            "loss_last")]
        cells += [f"<td>{_cell(s[k], '{:.2f}')}</td>" for k in (
            "step_ms_median", "forward_ms_median")]
        cells.append(f"<td>{_cell(s['peak_rss_mb'], '{:.0f}')}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return "<table>" + "\n".join(rows) + "</table>"


def _settings_table(runs: list[dict[str, Any]]) -> str:
    """Per run: what it trained with (session.json / journal header), and where it is."""
    rows = ['<tr><th class="l">run</th><th class="l">settings</th><th class="l">run '
            'directory</th></tr>']
    for run in runs:
        text = json.dumps(run["settings"], sort_keys=True, indent=None)
        rows.append(f'<tr><td class="l">{html.escape(run["name"])}</td>'
                    f'<td class="l"><code>{html.escape(text)}</code></td>'
                    f'<td class="l"><code>{html.escape(run["path"])}</code></td></tr>')
    return "<table>" + "\n".join(rows) + "</table>"


def render(runs: list[dict[str, Any]], *, title: str = "edgelearn runs",
           note: str = "") -> str:
    """The report page (HTML text) of loaded runs (`load_run`)."""
    summaries = [summarize(r) for r in runs]
    figures = "\n".join(f'<figure data-curve="{html.escape(t)}">{svg}</figure>'
                         for t, svg in charts(runs))
    names = ", ".join(html.escape(r["name"]) for r in runs)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Runs: {names}. {html.escape(note)}</p>
<h2>Summary</h2>
{_table(runs, summaries)}
<h2>Curves</h2>
<div class="grid">
{figures}
</div>
<h2>Settings</h2>
{_settings_table(runs)}
<p style="color:#777">Written by edgelearn report from each run's metrics.jsonl, session.json
and journal header. Self-contained: no script, no network.</p>
</body></html>
"""


def write_report(run_dirs: list[str | os.PathLike], out: str | os.PathLike, *,
                 title: str = "edgelearn runs", note: str = "") -> dict[str, Any]:
    """Write the HTML report of `run_dirs` to `out` (atomically); the `report --json` object.

    Args:
        run_dirs: run directories (each with metrics.jsonl); labelled by directory name, or by
            parent/name when two share a name.
        out: the .html file to write.
        title, note: page heading and a sentence under it.
    Returns: {"html": out, "runs": [summary per run]}.
    """
    if not run_dirs:
        raise InputError("report needs at least one run directory")
    names = [Path(d).name for d in run_dirs]
    dup = {n for n in names if names.count(n) > 1}
    runs = [load_run(d, f"{Path(d).parent.name}/{n}" if n in dup else n)
            for d, n in zip(run_dirs, names, strict=True)]
    atomic_write_bytes(out, render(runs, title=title, note=note).encode("utf-8"))
    return {"html": str(out), "runs": [summarize(r) for r in runs]}
