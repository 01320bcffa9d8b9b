"""`qbench leaderboard`: render `leaderboards/README.md` and its Pareto charts from the entries.

One table per model and subset, ranked by WER (then model bytes) within bit-width classes, with
the device profiles each entry fits; the speed column is the submitter's own measurement and
says which machine it came from. Where a table has a float baseline (the entry without a
quantizer), each entry's WER difference to it is shown with a paired-bootstrap 95 % interval
(`qbench.leaderboard.significance`), so that a rank the utterances cannot tell from noise is
marked as such. One chart per model and subset of WER against model bytes with the Pareto
front drawn (matplotlib, SVG written deterministically so the committed files only change when
the entries do).

The page is rendered only from entries `qbench validate` accepts (self-consistency checks), and
defensively all the same: every text that reaches the page is escaped for markdown and HTML,
chart text is plain (no mathtext; matplotlib XML-escapes it, and the written SVG is parsed back
to be sure), and every file is written only after its resolved path is checked to be inside the
leaderboard folder.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ElementTree
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from qbench.errors import QBenchError, one_line
from qbench.leaderboard.entry import EntryMachine, LeaderboardEntry, contained_path
from qbench.leaderboard.significance import (
    N_RESAMPLES,
    SEED,
    WerDifference,
    entry_wer_difference,
)
from qbench.leaderboard.validate import SCHEMA_FILE, check_leaderboards

CLASS_ORDER = ("float", "8 bits", "4 bits", "3 bits", "<=2 bits")


class LeaderboardError(QBenchError, ValueError):
    """The page cannot be rendered: an entry is invalid, or an output would leave the folder."""


def load_entries(root: Path) -> list[LeaderboardEntry]:
    """Every entry under `root`, refusing to go on when any of them is invalid."""
    n, entries, problems = check_leaderboards(root)
    if problems:
        raise LeaderboardError(f"{len(problems)} problem(s) in the {n} entries under {root}, the first: {problems[0]}; "
                               "`qbench validate` lists them all, and the page is rendered only from valid entries")
    return entries


# -- escaping ---------------------------------------------------------------------------------

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]|~$])")


def md(text: object) -> str:
    """`text` as literal markdown inline text (a table cell, a heading, a link text): one line,
    HTML characters as entities, markdown and math delimiters backslash-escaped, pipes too."""
    plain = one_line(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MARKDOWN_SPECIAL.sub(r"\\\1", plain)


def md_link_target(relative: str) -> str:
    """A relative path as a link target: every component percent-encoded."""
    return "/".join(quote(part, safe="") for part in relative.split("/"))


def chart_text(text: object) -> str:
    """Text for a matplotlib label: one line, `$` escaped so it is never read as mathtext."""
    return one_line(text).replace("$", r"\$")


# -- the chart --------------------------------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def _config(entry: LeaderboardEntry) -> str:
    if entry.quantizer is None:
        return "-"
    if entry.quantizer.plan_quantizers is not None:
        rules = entry.quantizer.config.get("rules") or []
        parts = []
        for rule in rules if isinstance(rules, list) else []:
            settings = " ".join(f"{k}={json.dumps(v)}" for k, v in sorted((rule.get("config") or {}).items()))
            parts.append(f"{rule.get('plugin') or 'float'} {settings}".strip() + f" ({len(rule.get('match') or [])} globs)")
        return f"plan {entry.quantizer.config.get('name')}: " + "; ".join(parts)
    text = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(entry.quantizer.config.items()))
    lowrank = entry.quantizer.policy.get("lowrank")
    if lowrank:
        text += f", low-rank r={lowrank['rank']} ({lowrank.get('dtype', 'float16')})"
    return text + (", embeddings" if entry.quantizer.policy.get("quantize_embeddings") else "")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated in (bytes, WER), both lower-is-better, sorted by bytes."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def chart_name(model: str, subset: str) -> str:
    return f"{model}__{subset}__pareto.svg"


@dataclass(frozen=True)
class ChartPoint:
    """One marker of a Pareto chart: weights in MiB against WER in %, its bit-width class (one
    of `CLASS_ORDER`, which picks the marker) and its label."""

    mib: float
    wer_percent: float
    bits_class: str
    label: str


def render_chart(entries: list[LeaderboardEntry], path: Path) -> None:
    points = []
    for e in entries:
        if e.quantizer is None:
            text = e.label.split("-")[0]
        elif e.quantizer.plan_quantizers is not None:
            text = f"plan {e.quantizer.config.get('name')}"
        else:
            text = f"{e.quantizer.name} {e.quantizer.mean_bits_per_weight:.1f}b"
        points.append(ChartPoint(e.model_bytes / 2**20, 100 * e.wer, e.bits_class, text))
    e0 = entries[0] if entries else None
    title = f"{e0.model.name} on {e0.dataset.subset} ({e0.dataset.utterance_count} utterances)" if e0 else ""
    draw_pareto_chart(points, title, path)


def draw_pareto_chart(points: list[ChartPoint], title: str, path: Path, log_wer: bool = True) -> None:
    """WER against weights, one marker per point, the Pareto front dashed, written as SVG to
    `path` deterministically (the leaderboard's charts and `qbench sweep`'s). `log_wer`: WER on
    a log axis (a sweep on a few utterances may score 0 %, which a log axis cannot place)."""
    try:
        import matplotlib
    except ImportError:  # an optional extra: running and testing need no plotting library
        raise LeaderboardError("the leaderboard's charts need matplotlib: pip install 'qbench[leaderboard]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # fixed ids and no timestamp: the SVG is a function of the entries alone
    plt.rcParams["svg.hashsalt"] = "qbench"
    plt.rcParams["svg.fonttype"] = "none"
    xy = [(p.mib, p.wer_percent) for p in points]
    front = pareto_front(xy)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for cls, marker in zip(CLASS_ORDER, "osD^v"):
        xs = [q for q, p in zip(xy, points) if p.bits_class == cls]
        if xs:
            ax.scatter([x for x, _ in xs], [y for _, y in xs], marker=marker, label=chart_text(cls), zorder=3)
    ax.plot([xy[i][0] for i in front], [xy[i][1] for i in front], "k--", lw=1, label="Pareto front", zorder=2)
    for (x, y), p in zip(xy, points):
        ax.annotate(chart_text(p.label), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xlabel("weights (MiB: packed codes, scales, unquantized tensors)")
    ax.set_ylabel("WER (%)")
    if log_wer:
        ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(chart_text(title))
    fig.tight_layout()
    fig.savefig(path, format="svg", metadata={"Date": None})
    plt.close(fig)
    try:
        ElementTree.parse(path)  # matplotlib escapes its text; a chart that is not XML is never kept
    except ElementTree.ParseError as exc:
        path.unlink()
        raise LeaderboardError(f"{path}: the chart came out as malformed SVG ({exc}); not written") from None


# -- the page ---------------------------------------------------------------------------------


def machine_description(machine: EntryMachine) -> str:
    threads = f", {machine.threads} threads" if machine.threads else ""
    blas = f", {machine.blas}" if machine.blas else ""
    return (f"{machine.processor}, {machine.cpu_count} CPUs{threads}, {machine.memory_bytes / 2**30:.0f} GiB, "
            f"{machine.platform}, Python {machine.python}, numpy {machine.numpy}{blas}")


def wer_points(difference: WerDifference) -> str:
    """A difference and its interval in WER points, `+0.41 [+0.12, +0.70]`, with ` (n.s.)` when
    the interval includes 0 (rounding never shows a `-0.00`)."""
    def signed(x: float) -> str:
        return f"{round(100 * x, 2) + 0.0:+.2f}"

    text = f"{signed(difference.difference)} [{signed(difference.low)}, {signed(difference.high)}]"
    return text if difference.significant else text + " (n.s.)"


def float_baseline(group: list[LeaderboardEntry]) -> LeaderboardEntry | None:
    """The table's float baseline: its one entry without a quantizer, else None (no difference column)."""
    baselines = [e for e in group if e.quantizer is None]
    return baselines[0] if len(baselines) == 1 else None


def render_markdown(entries: list[LeaderboardEntry]) -> str:
    groups: dict[tuple[str, str], list[LeaderboardEntry]] = defaultdict(list)
    for e in entries:
        groups[(e.model.name, e.dataset.subset)].append(e)
    lines = [
        "# qbench leaderboards",
        "",
        "Generated by `qbench leaderboard` from the entry files beside this page; do not edit by hand.",
        "Every entry is checked by `qbench validate` and can be rerun with `qbench verify ENTRY`, which",
        "recomputes every column but the speed. Entries are ranked by WER, then weights, within their",
        "bit-width class. WER and CER are corpus-level, after the Whisper English normalizer. Weights are",
        "the stored bytes (in flash or RAM), the real buffers: packed codes, scales and zero points, and",
        "every unquantized tensor at its stored precision. Bits/weight counts the quantized matrices (codes and",
        "everything stored beside them: scales, zeros, codebooks, transforms, low-rank factors); bits/param",
        "(all) is 8 x weights bytes / parameters, embedding and float layers included, which is what compares",
        "mixed-precision plans with uniform entries. Fits lists the device profiles where, as",
        "`qbench fit` reports, total RAM (weights in RAM + working peak, for the audio `qbench fit` assumes,",
        "batch 1) is within the device's RAM and the weights within its storage. The speed column is measured by each",
        "submitter on their own machine (named below each table): it is not rechecked and not ranked on.",
        "",
    ]
    for (model, subset), group in sorted(groups.items()):
        first = group[0]
        digest = first.dataset.utterance_ids_sha256  # one utterance set per table (validate checks)
        partial = " (a fixed part of the official subset)" if first.dataset.partial_subset else ""
        baseline = float_baseline(group)
        delta_header, delta_align = ("ΔWER vs float (95 % CI) | ", "---:|") if baseline else ("", "")
        lines += [
            f"## {md(model)} · {md(subset)}",
            "",
            f"{first.dataset.utterance_count} utterances{partial}, first {md(first.dataset.limit or 'all')} in sorted id order "
            f"of the shared sample; ids sha256 `{digest[:16]}…`.",
            "",
            f"![WER against weights]({md_link_target(chart_name(model, subset))})",
            "",
            f"| class | rank | quantizer | config | bits/weight | bits/param (all) | WER % | {delta_header}CER % | weights MiB | "
            "fits | RTFx (submitter's machine) | entry |",
            f"|---|---:|---|---|---:|---:|---:|{delta_align}---:|---:|---|---:|---|",
        ]
        by_speaker: list[tuple[str, WerDifference]] = []  # (label, speaker-level difference), in table order
        machines: dict[str, str] = {}  # description -> M1, M2, ... in order of first appearance
        by_class: dict[str, list[LeaderboardEntry]] = defaultdict(list)
        for e in group:
            by_class[e.bits_class].append(e)
        for cls in CLASS_ORDER:
            for rank, e in enumerate(sorted(by_class.get(cls, []), key=lambda e: (e.wer, e.model_bytes, e.label)), 1):
                q = e.quantizer
                name = f"{q.name} ({q.distribution or '?'} {q.distribution_version or ''})".strip() if q else "float baseline"
                if q is not None and q.plan_quantizers is not None:
                    # one plugin at two settings is one distribution: named once
                    distributions = dict.fromkeys(
                        f"{p.distribution or p.name} {p.distribution_version or p.version}" for p in q.plan_quantizers)
                    name = f"plan (qbench {q.version}; " + ", ".join(distributions) + ")"
                if e.activations is not None:
                    a = e.activations
                    name += f" + A{a.scheme.bits} {a.name}" + (f", KV{a.scheme.bits}" if a.kv_cache else "") + (
                        ", attention" if a.attention else "")
                if e.encoder_seconds is not None:
                    name += f", {e.encoder_seconds:g} s encoder windows"
                bits = f"{q.mean_bits_per_weight:.2f}" if q else "16"
                rel = f"{model}/{subset}/{e.label}.json"
                fits = ", ".join(e.devices_fitted) or "none"
                s = e.submitted_measurements
                machine = machines.setdefault(machine_description(s.machine), f"M{len(machines) + 1}")
                delta: list[str] = []  # no column without a baseline; "-" on the baseline's own row
                if baseline is not None:
                    delta = ["-"] if e is baseline else [wer_points(entry_wer_difference(e, baseline))]
                    if e is not baseline:
                        by_speaker.append((e.label, entry_wer_difference(e, baseline, unit="speaker")))
                all_bits = f"{8 * e.model_bytes / e.model.parameters:.2f}"
                cells = [cls, str(rank), name, _config(e), bits, all_bits, f"{100 * e.wer:.2f}", *delta, f"{100 * e.cer:.2f}",
                         _mib(e.model_bytes), fits, f"{s.rtfx:.1f} ({machine})"]
                lines.append("| " + " | ".join(md(c) for c in cells) + f" | [{md(e.label)}]({md_link_target(rel)}) |")
        lines.append("")
        if baseline is not None:
            lines += [
                "ΔWER vs float is the entry's WER minus the float baseline's in WER points, over the utterances both "
                f"scored, with a 95 % interval from a paired bootstrap over utterances ({N_RESAMPLES:,} resamples, seed {SEED}; "
                "both systems on the same resampled utterances); (n.s.) marks a difference whose interval includes 0, "
                "which these utterances cannot tell from noise.",
                "",
            ]
        if by_speaker:
            speakers = by_speaker[0][1].n_units
            lines += [
                f"The same difference with the {speakers} speakers resampled instead (each with all of their utterances, "
                "which are not independent of one another); with few speakers this interval is itself rough:",
                "",
            ]
            lines += [f"- {md(label)}: {md(wer_points(d))}" for label, d in by_speaker]
            lines.append("")
        counted = [e for e in group if e.compute is not None and e.compute.operations]
        if counted:
            lines += [
                "Arithmetic by operand width (the compute report: MACs of float32 activations are `fp32`, integer "
                "activations times integer codes `int`, times fp16 values `int x fp16`; ternary weights are additions), "
                "priced with Horowitz, ISSCC 2014, 45 nm (arithmetic only, memory traffic not included), per utterance:",
                "",
            ]
            for e in sorted(counted, key=lambda e: e.compute.arithmetic_energy_pj):
                ops = e.compute.operations
                n = max(1, e.dataset.utterance_count)
                fp32 = ops.get("fp32_mac", 0)
                integer = sum(v for k, v in ops.items() if k.startswith("int") and k.endswith("_mac") and "fp16" not in k)
                mixed = sum(v for k, v in ops.items() if k.endswith("xfp16_mac"))
                adds = sum(v for k, v in ops.items() if k.endswith("xternary_add"))
                lines.append(f"- {md(e.label)}: {e.compute.arithmetic_energy_pj / n / 1e9:.1f} mJ; G operations: "
                             f"fp32 {fp32 / n / 1e9:.2f}, int {integer / n / 1e9:.2f}, int x fp16 {mixed / n / 1e9:.2f}, "
                             f"ternary additions {adds / n / 1e9:.2f}")
            lines.append("")
        lines += ["Machines the speed was measured on, by their submitters:", ""]
        lines += [f"- {md(label)}: {md(description)}" for description, label in machines.items()]
        lines.append("")
    if not groups:
        lines += ["No entries yet.", ""]
    return "\n".join(lines)


def render_leaderboard(root: Path) -> list[Path]:
    """Write README.md, the charts and the entry JSON Schema; return the files written.

    Every output path is resolved and refused (`LeaderboardError`) unless inside `root`, so
    neither a name nor a symbolic link can make it write elsewhere."""
    entries = load_entries(root)
    groups: dict[tuple[str, str], list[LeaderboardEntry]] = defaultdict(list)
    for e in entries:
        groups[(e.model.name, e.dataset.subset)].append(e)
    outputs = [root / SCHEMA_FILE, root / "README.md"] + [root / chart_name(model, subset) for model, subset in groups]
    for path in outputs:  # all checked before anything is written
        try:
            contained_path(root, path)
        except QBenchError as exc:
            raise LeaderboardError(str(exc)) from None
    written = []
    (root / SCHEMA_FILE).write_text(json.dumps(LeaderboardEntry.model_json_schema(), indent=1) + "\n")
    written.append(root / SCHEMA_FILE)
    for (model, subset), group in groups.items():
        path = root / chart_name(model, subset)
        render_chart(group, path)
        written.append(path)
    (root / "README.md").write_text(render_markdown(entries))
    written.append(root / "README.md")
    return written
