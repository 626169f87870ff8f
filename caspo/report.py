"""Draw a CASPO run: reliability diagrams, per-round curves and a markdown summary.

Reads ``runs/NAME/rounds.jsonl`` (one JSON row per evaluated round, written by
:mod:`caspo.trainer.loop`; a resumed run may repeat a round, and the last row wins) and writes into
``runs/NAME/report/``:

* ``reliability.png`` one reliability diagram per round (accuracy per confidence bin, the diagonal,
  bin counts, the round's ECE in the title);
* ``curves.png``      accuracy, ECE, Brier, entropy gap and CaT accuracy (entropy / logprob scoring)
  against the round, and the training pairs per case as stacked bars; compared runs (the
  trajectory-level control, say) are overlaid, one colour per run;
* ``summary.md``      a table of the rounds per run, the change from the first round to the last, and
  links to the two figures.

``caspo report RUN_DIR [--out DIR] [--compare RUN_DIR ...]`` is the command-line entry point.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from caspo.core.gate import verdict as paired_verdict
from caspo.evaluation import compare_records, read_records
from caspo.plots import pyplot

__all__ = ["load_rounds", "write_report", "format_markdown_table", "SUMMARY_COLUMNS"]

# (row key, column header) of the summary table
SUMMARY_COLUMNS = [
    ("round", "round"),
    ("accuracy", "accuracy"),
    ("step_accuracy", "step acc"),
    ("ece", "ECE"),
    ("brier", "Brier"),
    ("auroc", "AUROC"),
    ("entropy_gap", "entropy gap"),
    ("cat_accuracy", "CaT entropy"),
    ("cat_recommended_accuracy", "CaT recommended"),
    ("pairs", "pairs"),
]

# metrics whose change from the first round to the last is reported, with the better direction
CHANGE_METRICS = [
    ("accuracy", "accuracy", "higher"),
    ("ece", "ECE", "lower"),
    ("brier", "Brier", "lower"),
    ("entropy_gap", "entropy gap", "higher"),
    ("cat_accuracy", "CaT entropy", "higher"),
    ("cat_recommended_accuracy", "CaT recommended", "higher"),
]


# ---- reading ----------------------------------------------------------------------------------------
def load_rounds(run_dir) -> list[dict]:
    """The rows of ``run_dir/rounds.jsonl``, one per round, sorted by round; a repeated round (a
    resumed run) keeps its last row. A missing file is a FileNotFoundError, a line that is not a JSON
    object with a ``round`` a ValueError naming the line."""
    path = Path(run_dir) / "rounds.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no rounds file {path}: is {run_dir} a `caspo loop` run directory?")
    rows: dict[int, dict] = {}
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from e
            if not isinstance(row, dict) or "round" not in row:
                raise ValueError(f"{path}: line {lineno} is not a round row (a JSON object with a 'round' key)")
            try:
                k = int(row["round"])
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}: line {lineno} has a bad round {row['round']!r}") from e
            rows[k] = {**row, "round": k}
    return [rows[k] for k in sorted(rows)]


def _num(v) -> float | None:
    """A finite float, or None for null / nan / anything non-numeric."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _run_name(run_dir) -> str:
    p = Path(run_dir)
    return (p.resolve().name or str(p)) if str(p) else "run"


def _unique_names(dirs: list) -> list[str]:
    names, seen = [], {}
    for d in dirs:
        n = _run_name(d)
        if n in seen:
            seen[n] += 1
            n = f"{n} ({seen[n]})"
        else:
            seen[n] = 1
        names.append(n)
    return names


# ---- markdown ---------------------------------------------------------------------------------------
def _cell(v) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{c} {n}" for c, n in sorted(v.items())) or "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.3f}" if math.isfinite(v) else "-"
    if v is None:
        return "-"
    return str(v).replace("|", "\\|").replace("\n", " ")


def format_markdown_table(rows: list[dict], columns: list | None = None) -> str:
    """A GitHub markdown table of ``rows``: floats to 3 decimals, null / nan as ``-``, dicts (pairs
    per case) as ``case n, ...``. ``columns`` is a list of keys or of (key, header) pairs; by default
    the round summary columns (:data:`SUMMARY_COLUMNS`)."""
    cols = [(c, c) if isinstance(c, str) else tuple(c) for c in (columns or SUMMARY_COLUMNS)]
    # numbers right-aligned, text (names, pairs per case) left-aligned
    text = {k for k, _ in cols if any(isinstance(r.get(k), (str, dict)) for r in rows) or k == "pairs"}
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "|".join("---" if k in text else "---:" for k, _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell_ci(r, k) for k, _ in cols) + " |")
    return "\n".join(lines) + "\n"


def _cell_ci(row: dict, key: str) -> str:
    """A cell and, when the row carries ``<key>_ci``, its 95% interval."""
    ci = row.get(f"{key}_ci")
    if ci and _num(ci[0]) is not None and _num(row.get(key)) is not None:
        return f"{_cell(row.get(key))} [{_cell(ci[0])}, {_cell(ci[1])}]"
    return _cell(row.get(key))


def _signed(x: float) -> str:
    return f"{x:+.3f}"


def _greedy_records(run_dir, row: dict) -> Path:
    return Path(run_dir) / "eval" / f"round{row['round']}_greedy.jsonl"


def paired_change(run_dir, first: dict, last: dict, last_dir=None) -> dict | None:
    """``last`` − ``first`` on the same held-out problems, from the per-problem greedy records the loop
    keeps (``eval/round<K>_greedy.jsonl``; ``last`` read from ``last_dir`` when given: another run at
    its round): paired bootstrap intervals and McNemar's p (:func:`caspo.evaluation.compare_records`);
    None when either file is missing or they differ in problems."""
    paths = [_greedy_records(run_dir, first), _greedy_records(last_dir if last_dir is not None else run_dir, last)]
    if not all(p.is_file() for p in paths):
        return None
    try:
        return compare_records(read_records(paths[0]), read_records(paths[1]))
    except ValueError:
        return None


def _change_table(rows: list[dict], paired: dict | None = None, labels: tuple[str, str] | None = None) -> str:
    """The change from the first row to the last (two rounds of a run, or two runs' last rounds, named by
    ``labels``); with ``paired`` (:func:`paired_change`), a metric that has a paired interval is judged by
    it: "better"/"worse" only when the interval excludes zero; a metric without an interval gets its
    direction only."""
    first, last = rows[0], rows[-1]
    out = []
    for key, label, better in CHANGE_METRICS:
        a, b = _num(first.get(key)), _num(last.get(key))
        d = None if a is None or b is None else b - a
        ci = (paired or {}).get(f"{key}_ci")
        if d is not None and ci and _num((paired or {}).get(key)) is not None:
            d = _num(paired[key])  # the paired estimate its interval belongs to (the same up to rounding)
        if d is None:
            verdict = "-"
        elif ci and ci[0] is not None and ci[0] <= 0 <= ci[1]:
            verdict = "no change shown (interval holds 0)"
        elif abs(d) < 5e-4:
            verdict = "unchanged"
        elif not (ci and ci[0] is not None):  # no per-problem records for this metric: say the direction only
            verdict = ("higher" if d > 0 else "lower") + ", not judged (no interval)"
        else:
            verdict = paired_verdict(d, ci, better)
        change = "-" if d is None else _signed(d)
        if d is not None and ci and ci[0] is not None:
            change += f" [{_signed(ci[0])}, {_signed(ci[1])}]"
            if key == "accuracy":
                change += f" (McNemar p {paired['accuracy_mcnemar_p']:.2g})"
        out.append({"metric": label, "first": a, "last": b, "change": change, "verdict": f"{verdict} ({better} is better)"})
    head = "change [paired 95% CI]" if paired else "change"
    names = labels or (f"round {first['round']}", f"round {last['round']}")
    cols = [("metric", "metric"), ("first", names[0]), ("last", names[1]), ("change", head), ("verdict", "verdict")]
    return format_markdown_table(out, cols)


def _run_section(name: str, run_dir, rows: list[dict]) -> str:
    modes = sorted({str(r["mode"]) for r in rows if r.get("mode")})
    cat = sorted({(r.get("cat_k"), r.get("cat_tau")) for r in rows if r.get("cat_k") is not None}, key=str)
    meta = [f"run dir `{run_dir}`", f"{len(rows)} round(s)"]
    if modes:
        meta.append("pairs: " + "/".join(modes))
    if cat:
        meta.append("CaT " + ", ".join(f"K={k} tau={t}" for k, t in cat))
    parts = [f"## {name}\n", " · ".join(meta) + "\n", format_markdown_table(rows)]
    if len(rows) >= 2:
        parts.append(f"Change from round {rows[0]['round']} to round {rows[-1]['round']}:\n")
        paired = paired_change(run_dir, rows[0], rows[-1])
        parts.append(_change_table(rows, paired))
        if paired:
            parts.append(f"Intervals in the change column: paired bootstrap over the {paired['n']} held-out problems "
                         "(greedy; the CaT columns have no per-problem records, so no paired interval).\n")
    else:
        parts.append("Only one round: no change to report yet.\n")
    return "\n".join(parts)


# ---- figures ----------------------------------------------------------------------------------------
def _reliability_axes(ax, row: dict, title: str) -> None:
    bins = row.get("reliability") or []
    ax.plot([0, 1], [0, 1], ls="--", color="0.5", lw=1, label="perfect calibration")
    counts = [int(_num(b.get("count")) or 0) for b in bins]
    total = sum(counts)
    for b, n in zip(bins, counts):
        lo, hi, acc = _num(b.get("lo")), _num(b.get("hi")), _num(b.get("accuracy"))
        if lo is None or hi is None or not n or acc is None:
            continue
        ax.bar(lo, acc, width=hi - lo, align="edge", color="tab:blue", alpha=0.75, edgecolor="white", lw=0.5)
        mc = _num(b.get("mean_confidence"))
        if mc is not None:
            ax.plot([mc], [acc], marker="o", ms=2.5, color="tab:red")
        # the answers in the bin, just above the frame where no bar can hide it
        ax.text((lo + hi) / 2, 1.015, str(n), ha="center", va="bottom", fontsize=6, color="0.25", clip_on=False)
    if total:
        # the share of answers per bin, as a light histogram along the bottom
        for b, n in zip(bins, counts):
            lo, hi = _num(b.get("lo")), _num(b.get("hi"))
            if n and lo is not None and hi is not None:
                ax.bar(lo, 0.25 * n / max(counts), width=hi - lo, align="edge", color="0.6", alpha=0.45, lw=0)
    else:
        ax.text(0.5, 0.5, "no reliability data", ha="center", va="center", fontsize=8, color="0.4", transform=ax.transAxes)
    ece = _num(row.get("ece"))
    ax.set_title(f"{title}\nECE {ece:.3f}" if ece is not None else f"{title}\nECE -", fontsize=9, pad=11)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.tick_params(labelsize=7)


def _plot_reliability(runs: list[tuple[str, list[dict]]], path: Path) -> None:
    plt = pyplot()
    max_cols = 5
    layout = []  # (run index, row) per panel, each run starting on a new grid row
    grid_rows = 0
    for i, (_, rows) in enumerate(runs):
        n_grid = max(1, math.ceil(len(rows) / max_cols))
        for j, r in enumerate(rows):
            layout.append((grid_rows + j // max_cols, j % max_cols, i, r))
        grid_rows += n_grid
    ncols = min(max_cols, max(len(rows) for _, rows in runs))
    fig, axes = plt.subplots(grid_rows, ncols, figsize=(2.8 * ncols + 0.6, 3.5 * grid_rows + 0.7), squeeze=False)
    used = set()
    for gr, gc, i, r in layout:
        ax = axes[gr][gc]
        used.add((gr, gc))
        name = runs[i][0]
        _reliability_axes(ax, r, f"{name}: round {r['round']}" if len(runs) > 1 else f"round {r['round']}")
        if gc == 0:
            ax.set_ylabel("accuracy", fontsize=8)
        ax.set_xlabel("confidence", fontsize=8)
    for gr in range(grid_rows):
        for gc in range(ncols):
            if (gr, gc) not in used:
                axes[gr][gc].set_visible(False)
    title = "Reliability per round" + ("" if len(runs) > 1 else f": {runs[0][0]}")
    fig.suptitle(f"{title}  (bars: accuracy per confidence bin, numbers above: answers per bin, grey: bin share, red: mean confidence)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97 if grid_rows > 1 else 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)


CURVE_PANELS = [
    ("Greedy accuracy", [("accuracy", "-", "answer"), ("step_accuracy", ":", "step")], "accuracy"),
    ("ECE (lower is better)", [("ece", "-", None)], "ECE"),
    ("Brier score (lower is better)", [("brier", "-", None)], "Brier"),
    ("Entropy gap (wrong − right steps)", [("entropy_gap", "-", None)], "entropy gap"),
    ("CaT accuracy", [("cat_accuracy", "-", "Algorithm 2 (entropy)"), ("cat_recommended_accuracy", "--", "recommended (config cat)")], "accuracy"),
]


def _plot_curves(runs: list[tuple[str, list[dict]]], path: Path) -> None:
    plt = pyplot()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.4))
    flat = axes.ravel()
    for ax, (title, series, ylabel) in zip(flat, CURVE_PANELS):
        for (name, rows), color in zip(runs, colors):
            xs = [r["round"] for r in rows]
            for key, ls, _ in series:
                ys = [_num(r.get(key)) for r in rows]
                ys = [math.nan if y is None else y for y in ys]
                ax.plot(xs, ys, ls=ls, marker="o", ms=4, color=color, lw=1.6)
                cis = [r.get(f"{key}_ci") or (None, None) for r in rows]
                if any(_num(c[0]) is not None for c in cis):  # the 95% interval as a band
                    lo = [math.nan if _num(c[0]) is None else c[0] for c in cis]
                    hi = [math.nan if _num(c[1]) is None else c[1] for c in cis]
                    ax.fill_between(xs, lo, hi, color=color, alpha=0.15, lw=0)
        if len(series) > 1:
            ax.legend(handles=[Line2D([], [], color="0.2", ls=ls, marker="o", ms=4, label=lab) for _, ls, lab in series], fontsize=8, loc="best")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round", fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    flat[3].axhline(0, color="0.5", lw=0.8)  # the entropy gap: above 0, wrong steps are less certain

    # pairs per case: stacked bars per round, one bar per run side by side
    ax = flat[5]
    cases = sorted({c for _, rows in runs for r in rows for c in (r.get("pairs") or {})})
    case_colors = {c: f"C{(i + len(runs)) % 10}" for i, c in enumerate(cases)}
    width = 0.8 / len(runs)
    for i, ((name, rows), color) in enumerate(zip(runs, colors)):
        off = (i - (len(runs) - 1) / 2) * width
        bottom = {r["round"]: 0.0 for r in rows}
        for c in cases:
            xs, hs, bs = [], [], []
            for r in rows:
                n = _num((r.get("pairs") or {}).get(c)) or 0.0
                if n:
                    xs.append(r["round"] + off)
                    hs.append(n)
                    bs.append(bottom[r["round"]])
                    bottom[r["round"]] += n
            if xs:
                ax.bar(xs, hs, width=width * 0.95, bottom=bs, color=case_colors[c], edgecolor=color if len(runs) > 1 else "white", lw=1.5 if len(runs) > 1 else 0.5)
    handles = [Patch(facecolor=case_colors[c], label=c.replace("_", " ")) for c in cases]
    if handles:
        tallest = max((sum(_num(v) or 0.0 for v in (r.get("pairs") or {}).values()) for _, rows in runs for r in rows), default=0.0)
        ax.set_ylim(0, max(1.0, tallest) * (1.15 + 0.12 * math.ceil(len(cases) / 3)))  # headroom for the legend
        ax.legend(handles=handles, fontsize=8, loc="upper left", ncol=min(3, len(cases)), title="case", title_fontsize=8)
    else:
        ax.text(0.5, 0.5, "no pairs recorded", ha="center", va="center", color="0.4", transform=ax.transAxes)
    ax.set_title("Training pairs per case" + (" (bar outline = run)" if len(runs) > 1 else ""), fontsize=10)
    ax.set_xlabel("round (pairs trained into that round's policy)", fontsize=9)
    ax.set_ylabel("pairs", fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3, axis="y")
    ax.tick_params(labelsize=8)

    if len(runs) > 1:
        fig.legend(handles=[Line2D([], [], color=c, lw=2.5, label=n) for (n, _), c in zip(runs, colors)], loc="upper right", ncol=len(runs), fontsize=9, title="run", title_fontsize=9)
        fig.suptitle("CASPO rounds: " + " vs ".join(n for n, _ in runs), fontsize=12, x=0.02, ha="left")
    else:
        fig.suptitle(f"CASPO rounds: {runs[0][0]}", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the report ---------------------------------------------------------------------------------------
def write_report(run_dir, out_dir=None, compare: list[str] | None = None) -> dict:
    """Write reliability.png, curves.png and summary.md for ``run_dir`` (and the ``compare`` runs,
    overlaid) into ``out_dir`` (default ``run_dir/report``). Returns the paths and the round count."""
    run_dir = Path(run_dir)
    dirs = [run_dir] + [Path(d) for d in (compare or [])]
    names = _unique_names(dirs)
    runs = []
    for d, name in zip(dirs, names):
        rows = load_rounds(d)
        if not rows:
            raise ValueError(f"{d / 'rounds.jsonl'} holds no rounds yet")
        runs.append((name, rows))
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    paths = {"summary": out / "summary.md", "reliability": out / "reliability.png", "curves": out / "curves.png"}

    _plot_reliability(runs, paths["reliability"])
    _plot_curves(runs, paths["curves"])

    title = runs[0][0] + (" vs " + ", ".join(n for n, _ in runs[1:]) if len(runs) > 1 else "")
    doc = [
        f"# CASPO report: {title}\n",
        "Greedy metrics and CaT accuracy on the fixed held-out set after each round (round 0: the base policy). "
        "ECE and Brier: lower is better; entropy gap: mean entropy of wrong steps minus right steps, higher separates them better. "
        "Brackets and bands: 95% intervals (Wilson for accuracy, bootstrap over problems otherwise).\n",
        "- [reliability diagrams](reliability.png)\n- [per-round curves](curves.png)\n",
        "![per-round curves](curves.png)\n",
    ]
    for (name, rows), d in zip(runs, dirs):
        doc.append(_run_section(name, d, rows))
    if len(runs) > 1:
        doc.append("## Side by side (last round)\n")
        last = [{**rows[-1], "run": name} for name, rows in runs]
        doc.append(format_markdown_table(last, [("run", "run")] + SUMMARY_COLUMNS))
        (name_a, rows_a), dir_a = runs[0], dirs[0]
        for (name_b, rows_b), dir_b in zip(runs[1:], dirs[1:]):
            a, b = rows_a[-1], rows_b[-1]
            paired = paired_change(dir_a, a, b, last_dir=dir_b)
            labels = (f"{name_a} round {a['round']}", f"{name_b} round {b['round']}")
            doc.append(f"{labels[1]} − {labels[0]}:\n")
            doc.append(_change_table([a, b], paired, labels))
            if paired:
                doc.append(f"Intervals: paired bootstrap over the {paired['n']} held-out problems both runs were judged on (greedy).\n")
    doc.append("![reliability diagrams](reliability.png)\n")
    paths["summary"].write_text("\n".join(doc))
    return {"summary": str(paths["summary"]), "reliability": str(paths["reliability"]), "curves": str(paths["curves"]), "rounds": len(runs[0][1])}
