"""The `qbench` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from qbench import __version__
from qbench.errors import QBenchError, one_line

console = Console(stderr=True)
out = Console()


class CliError(QBenchError):
    """A user-facing error: printed as one line, exit status 2."""


def say(text: str, style: str | None = None) -> None:
    """A message on stderr as plain text: names and paths are never read as rich markup, and a
    long line is never wrapped."""
    console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _mib(n: int | None) -> str:
    """Bytes as MiB for a table column whose header carries the unit (a value without a space
    never wraps)."""
    return "-" if n is None else f"{n / 2**20:.1f}"


Cell = str | Text


def show_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Cell]], notes: Sequence[str] = (),
               left_columns: int = 0, prose_columns: Sequence[int] = ()) -> None:
    """A table on stdout that never cuts a value, at any width and when piped (80 columns).

    Headers may wrap between words; values never wrap, fold or end in an ellipsis. Rich's own
    shrinking cuts values once headers are narrow enough, so the widths are chosen here: every
    column gets its longest value (and longest header word), the room left goes to the headers,
    and when even the narrowest layout is wider than the console, each row is printed as
    `header  value` lines instead. Every cell is plain text, never markup. `notes` follow as
    plain text (footnotes that say what a figure is). Values in `prose_columns` (descriptions)
    may wrap between words, as headers do."""
    cells = [[c if isinstance(c, Text) else Text(str(c)) for c in row] for row in rows]
    heads = [Text(h) for h in headers]

    def least(text: str, wraps: bool) -> int:  # the narrowest a cell can be without cutting a word
        return max((len(w) for w in text.split()), default=0) if wraps else len(text)

    needed = [max([least(h.plain, True)] + [least(row[i].plain, i in prose_columns) for row in cells] + [1])
              for i, h in enumerate(heads)]
    natural = [max([len(h.plain)] + [len(row[i].plain) for row in cells]) for i, h in enumerate(heads)]

    def table(widths: list[int]) -> Table:
        # a rule under the header and two spaces between columns: what 80 columns have room for
        t = Table(title=Text(title), expand=False, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                  pad_edge=False, collapse_padding=True)
        for i, (head, width) in enumerate(zip(heads, widths)):
            t.add_column(head, justify="left" if i < left_columns else "right", width=width, no_wrap=False,
                         overflow="fold")
        for row in cells:
            t.add_row(*row)
        return t

    narrow = table(needed)
    # measured unclamped (a measurement is capped at the width it is given)
    room = out.width - Measurement.get(out, out.options.update_width(10_000), narrow).maximum
    if room >= 0:
        widths = list(needed)
        for i in sorted(range(len(widths)), key=lambda i: natural[i] - needed[i]):  # least to gain first
            grow = min(natural[i] - widths[i], room)
            widths[i] += grow
            room -= grow
        out.print(table(widths))
    else:
        # one `header  value` line per cell, never wrapped by rich (a terminal folds what is
        # wider than it; a pipe gets the line whole)
        out.print(Text(title, style="italic"), soft_wrap=True)
        key_width = max(len(h.plain) for h in heads)
        for row in cells:
            for head, cell in zip(heads, row):
                out.print(Text.assemble(head.plain.ljust(key_width + 2), cell), soft_wrap=True)
            out.print()
    for note in notes:
        out.print(Text(note))


# ------------------------------------------------------------------------------------------------
# qbench run
# ------------------------------------------------------------------------------------------------
class RichProgress:
    """`RunProgress` drawn with rich on stderr: one bar for quantizing, one for transcribing
    (the notes are printed under --quiet too)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self._bar: Progress | None = None
        self._phase: str | None = None
        self._task = None

    def note(self, message: str) -> None:
        say(message)

    def _start(self, phase: str, columns: tuple, description: str, total: int) -> None:
        self.close()
        self._bar = Progress(*columns, console=console, disable=self.quiet)
        self._bar.start()
        self._phase = phase
        self._task = self._bar.add_task(description, total=total)

    def quantizing(self, layer: str, done: int, total: int) -> None:
        if self._phase != "quantizing":
            # layer and run names are shown as they are, never read as markup
            columns = (TextColumn("quantizing {task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn())
            self._start("quantizing", columns, layer, total)
        self._bar.update(self._task, completed=done, description=layer)

    def transcribing(self, description: str, total: int) -> None:
        columns = (TextColumn("{task.description}", markup=False, style="bold"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn())
        self._start("transcribing", columns, description, total)

    def transcribed(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        self._bar, self._phase = None, None


class RerunProgress(RichProgress):
    """`qbench verify`'s progress: the rerun's scratch files (a temporary folder the entry's
    rerun writes its result and artifact to, then deletes) are not the user's to look at, so
    notes naming them are left out."""

    _SCRATCH = re.compile(re.escape(tempfile.gettempdir()) + r"/tmp[A-Za-z0-9_]{8}/")

    def note(self, message: str) -> None:
        if not self._SCRATCH.search(message):
            super().note(message)


def speed_list(text: str) -> tuple[float, ...]:
    """`--calibration-speeds 0.9,1.1`."""
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected speeds like 0.9,1.1") from None


def add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    """The calibration options `run` and `quantize` share (`spec_from_args` reads them)."""
    parser.add_argument("--calibration-subset", default="dev-clean")
    parser.add_argument("--calibration-limit", type=int, default=None)
    parser.add_argument("--calibration-ids", metavar="FILE",
                        help="exactly these calibration utterances (one id a line, or a leaderboard entry's)")
    parser.add_argument("--calibration-data-dir", metavar="DIR",
                        help="folder holding LibriSpeech/ with the calibration subset, when it is not beside the "
                             "evaluation audio (default: where --data-dir's search finds it)")
    parser.add_argument("--calibration-speeds", type=speed_list, metavar="F,F",
                        help="add a speed-perturbed copy of every calibration utterance at each speed, e.g. 0.9,1.1 "
                             "(more calibration rows from the same utterances; recorded in the entry)")
    parser.add_argument("--calibration-without-padding", action="store_true",
                        help="count only the calibration rows inference feeds, not the decoder's padding past end of "
                             "text (recorded in the entry as counts_padding=false)")


def read_ids(path: str, which: str) -> list[str]:
    """Utterance ids from a text file (one a line) or from a leaderboard entry (`.json`): its
    scored utterances (`which="scored"`) or its calibration set (`which="calibration"`), so a
    new entry can be made on exactly the utterances of the committed ones."""
    if path.endswith(".json"):
        from qbench.leaderboard.entry import read_entry

        entry = read_entry(Path(path))
        if which == "scored":
            return [u.id for u in entry.utterances]
        if entry.calibration is None:
            raise CliError(f"{path}: the entry has no calibration set")
        return list(entry.calibration.utterance_ids)
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def spec_from_args(args: argparse.Namespace):
    """The `RunSpec` the `qbench run` arguments describe."""
    from pydantic import ValidationError

    from qbench.quant.plan import read_plan
    from qbench.quant.settings import parse_setting_values
    from qbench.run import RunSpec, spec_error

    # values only: the plugin's own process checks them against its Config
    config = parse_setting_values(args.set or [], args.plugin or "?")
    if config and not args.plugin:
        raise CliError("--set configures a quantizer: give --plugin NAME too")
    try:
        return RunSpec(
            model=args.model, weights=args.weights, subset=args.subset, data_dir=args.data_dir, limit=args.limit,
            utterance_ids=read_ids(args.utterance_ids, "scored") if args.utterance_ids else None,
            device=args.device, plugin=args.plugin, config=config,
            plan=read_plan(Path(args.plan)) if getattr(args, "plan", None) else None,
            policy=policy_from_args(args),
            calibration_subset=args.calibration_subset, calibration_limit=args.calibration_limit,
            calibration_ids=read_ids(args.calibration_ids, "calibration") if args.calibration_ids else None,
            calibration_data_dir=args.calibration_data_dir,
            calibration_counts_padding=not getattr(args, "calibration_without_padding", False),
            calibration_speeds=getattr(args, "calibration_speeds", None) or (),
            artifact=getattr(args, "artifact", None), plugin_timeout=args.plugin_timeout,
            threads=args.threads, batch_size=args.batch_size, output=args.output,
            activations=activations_from_args(args), encoder_seconds=getattr(args, "encoder_seconds", None),
        )
    except ValidationError as exc:
        raise CliError(str(spec_error(exc, "qbench run"))) from None


def activations_from_args(args: argparse.Namespace):
    """The `ActivationChoice` of `--act NAME [--act-set KEY=VALUE] [--kv-cache]`, or None."""
    from qbench.quant.activation_scheme import ActivationChoice
    from qbench.quant.settings import parse_setting_values

    name = getattr(args, "act", None)
    settings = getattr(args, "act_set", None) or []
    if name is None:
        if settings or getattr(args, "kv_cache", False) or getattr(args, "act_attention", False):
            raise CliError("--act-set, --kv-cache and --act-attention configure an activation scheme: give --act NAME too")
        return None
    return ActivationChoice(name=name, config=parse_setting_values(settings, name), kv_cache=bool(args.kv_cache),
                            attention=bool(getattr(args, "act_attention", False)))


def add_activation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--act", metavar="NAME", help="quantize every linear input by this activation scheme "
                        "(qbench plugins lists them; absmax8 = per-token absmax at 8 bits, BitNet b1.58's)")
    parser.add_argument("--act-set", action="append", metavar="KEY=VALUE", help="activation scheme config, repeatable")
    parser.add_argument("--kv-cache", action="store_true", help="also store attention keys/values quantized (the "
                        "scheme's bits, absmax per token and head)")
    parser.add_argument("--act-attention", action="store_true", help="also run attention on quantized Q, K, V (per "
                        "token and head) and probabilities (unsigned codes at the scheme's bits)")


@contextlib.contextmanager
def stops_raise_interrupted() -> Iterator[None]:
    """SIGINT and SIGTERM (a scheduler, `kill`) raise `RunInterrupted` inside the block, as
    Ctrl-C does: what is finished is saved and the journals stay for a rerun to resume from.
    The handlers found are put back after (only the main thread may set them)."""
    import signal
    import threading

    from qbench.evaluate import RunInterrupted

    def stop(signum: int, _frame) -> None:
        raise RunInterrupted(signum)

    stopping = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    previous = {signum: signal.signal(signum, stop) for signum in stopping}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def cmd_run(args: argparse.Namespace) -> int:
    from qbench.evaluate import RunFailed, RunInterrupted
    from qbench.run import run_benchmark

    spec = spec_from_args(args)
    progress = RichProgress(args.quiet)
    if args.submit:
        spec = plan_submission(spec, Path(args.leaderboards), progress)
    try:
        with stops_raise_interrupted():
            result = run_benchmark(spec, progress, force=args.force)
    except RunFailed as exc:
        done = len(exc.result.utterances)
        raise CliError(f"{exc} ({done} utterances finished are saved in {spec.output_path})") from None
    except RunInterrupted as exc:
        progress.close()
        saved = (f"{len(exc.result.utterances)} utterances are saved in {spec.output_path} (status interrupted); "
                 "run the same command again to resume") if exc.result is not None else "nothing was transcribed yet"
        say(f"interrupted by {exc.args[0]}: {saved}", "red")
        return 128 + exc.signum
    finally:
        progress.close()
    if result.device is not None and not result.device["fits"]:
        say(result.error, "red")
        say(f"result written to {spec.output_path} (device.fits = false)"
            + ("; no leaderboard entry: an entry is a run that fits its device" if args.submit else ""))
        return 3
    print_summary(result)
    if result.device is not None:
        print_device_summary(result.device, lean=result.activations is not None)
    say(f"result written to {spec.output_path}")
    if args.submit:
        submit_entry(result, Path(args.leaderboards))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from qbench.run import quantize_to_artifact

    spec = spec_from_args(args)
    target = Path(args.artifact_output) if args.artifact_output else Path("results") / f"{spec.model_label}__{spec.label}.safetensors"
    progress = RichProgress(args.quiet)
    try:
        path, record = quantize_to_artifact(spec, target, progress)
    finally:
        progress.close()
    say(f"{record['quantizer']} {record['quantizer_version']}: {record['mean_bits_per_weight']:.2f} bits per quantized "
        f"weight, model {_fmt_bytes(record['model_bytes'])}; `qbench run --artifact {path}` evaluates it")
    return 0


# ------------------------------------------------------------------------------------------------
# qbench sweep
# ------------------------------------------------------------------------------------------------
#: `qbench sweep` flags that set a RunSpec field of every point (over the sweep file's [base])
SWEEP_BASE_FLAGS = ("model", "weights", "subset", "data_dir", "limit", "device", "batch_size", "calibration_subset",
                    "calibration_limit", "calibration_data_dir", "plugin_timeout")


def sweep_from_args(args: argparse.Namespace):
    """The `SweepSpec` of a sweep file and/or `--grid`, with the flags' settings over its base."""
    from qbench.sweep.spec import SweepSpec, grid_name, parse_grid, read_sweep

    if args.spec is None and not args.grid:
        raise CliError("qbench sweep needs a sweep file (qbench sweep SPEC.toml) or --grid KEY=V1,V2 ...")
    sweep = read_sweep(Path(args.spec)) if args.spec is not None else None
    base = dict(sweep.base) if sweep is not None else {}
    for flag in SWEEP_BASE_FLAGS:
        if getattr(args, flag) is not None:
            base[flag] = getattr(args, flag)
    if args.utterance_ids:
        base["utterance_ids"] = read_ids(args.utterance_ids, "scored")
    if args.calibration_ids:
        base["calibration_ids"] = read_ids(args.calibration_ids, "calibration")
    grid = {**(sweep.grid if sweep is not None else {}), **parse_grid(args.grid or [])}
    name = args.name or (sweep.name if sweep is not None and not args.grid else grid_name(base, grid))
    return SweepSpec(name=name, base=base, grid=grid, points=sweep.points if sweep is not None else [],
                     shards=sweep.shards if sweep is not None else None)


def cmd_sweep(args: argparse.Namespace) -> int:
    import os
    import signal

    from qbench.evaluate import RunInterrupted
    from qbench.sweep.progress import RichSweepProgress
    from qbench.sweep.runner import run_sweep

    for flag in ("shards", "workers", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise CliError(f"--{flag} must be at least 1 (got {getattr(args, flag)})")
    sweep = sweep_from_args(args)
    out = Path(args.out or Path("results") / "sweeps" / sweep.name)
    specs = sweep.run_specs(out / "points")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if args.executor == "ray":
        from qbench.sweep.ray_executor import RayExecutor

        threads = args.threads or sweep.base.get("threads") or 1
        executor = RayExecutor(args.address, args.workers, cpus_per_task=threads)
        say(f"Ray cluster: {executor.workers} tasks at once ({threads} CPU each)")
    else:
        from qbench.sweep.local import LocalExecutor, pool_size

        if args.address:
            raise CliError("--address names a Ray cluster: give --executor ray too")
        workers, why = (args.workers, f"{args.workers} local worker{'s' if args.workers > 1 else ''} (--workers)") if args.workers else pool_size(specs)
        # every worker gets its share of the cores (a run's result is the same on any count)
        threads = args.threads or sweep.base.get("threads") or max(1, cores // workers)
        executor = LocalExecutor(workers)
        say(f"{why}, {threads} thread{'s' if threads > 1 else ''} each")
    shards = args.shards or sweep.shards or executor.workers
    say(f"sweep {sweep.name}: {len(specs)} points, up to {shards} shards each, in {out}")
    progress = RichSweepProgress(console, args.quiet)

    try:
        with stops_raise_interrupted():
            outcome = run_sweep(sweep.name, specs, out, executor, shards, threads, progress)
    except KeyboardInterrupt as exc:
        progress.close()
        say(f"interrupted by {exc.args[0] if exc.args else 'SIGINT'}: finished points, shards and artifacts are kept "
            f"in {out}; run the same command again to resume", "red")
        return 128 + (exc.signum if isinstance(exc, RunInterrupted) else signal.SIGINT)
    finally:
        progress.close()
        executor.close()
    print_sweep_summary(outcome)
    draw_sweep_charts(outcome, out)
    failed = outcome.failed
    say(f"sweep results in {out / 'points'}; manifest {out / 'sweep.json'}")
    if failed:
        say(f"{len(failed)} of {len(outcome.points)} points failed", "red")
    return 1 if failed else 0


def print_sweep_summary(outcome) -> None:
    rows = []
    for point in outcome.points:
        r, m = point.result, point.result.metrics if point.result is not None else None
        rows.append([point.record.label, point.record.status, f"{100 * m.wer:.2f}" if m else "-",
                     _mib(m.model_bytes) if m else "-", str(m.utterances) if m else "-",
                     f"{m.wall_seconds:.1f}" if m else "-",
                     point.record.reason or (f"{r.resumed_utterances} resumed" if r is not None and r.resumed_utterances
                                             else "")])
    show_table(f"sweep {outcome.name}", ["point", "status", "WER %", "weights MiB", "utterances", "wall s", "reason"],
               rows, left_columns=2, prose_columns=(6,),
               notes=["wall s: the model's time summed over the point's shards (as a single run's, whichever worker ran them)"])


def draw_sweep_charts(outcome, out: Path) -> None:
    """One Pareto chart (WER against weights) per model and subset of the complete points."""
    from qbench.leaderboard.entry import bits_class_of
    from qbench.leaderboard.page import ChartPoint, LeaderboardError, draw_pareto_chart
    from qbench.sweep.state import SweepLayout

    groups: dict[tuple[str, str], list] = {}
    for point in outcome.points:
        r = point.result
        if point.record.status == "complete" and r is not None and r.metrics is not None:
            bits = (r.quantization or {}).get("mean_bits_per_weight")
            groups.setdefault((r.model.name, r.dataset.subset), []).append(
                (ChartPoint(r.metrics.model_bytes / 2**20, 100 * r.metrics.wer, bits_class_of(bits), point.record.label),
                 r.dataset.utterance_count))
    for (model, subset), points in groups.items():
        path = SweepLayout(out).chart(model, subset)
        count = max(n for _, n in points)
        try:
            draw_pareto_chart([p for p, _ in points], f"{model} on {subset} ({count} utterances)", path,
                              log_wer=all(p.wer_percent > 0 for p, _ in points))
        except LeaderboardError as exc:
            say(f"no chart: {exc}")
            return
        say(f"Pareto chart (WER against weights) written to {path}")


def committed_utterances(root: Path, model: str, subset: str) -> tuple[list[str], Path] | None:
    """The utterance ids the committed entries of `model` on `subset` scored, and the entry
    they come from: the first that parses in `qbench validate`'s order (`entry_files`), the
    one validate compares every other entry of the table with. None: no entry yet."""
    from qbench.leaderboard.validate import check_entry, entry_files

    table = root / model / subset
    for path in entry_files(root):
        if path.parent == table:
            entry, _ = check_entry(path, root)
            if entry is not None:
                return [u.id for u in entry.utterances], path
    return None


def plan_submission(spec, root: Path, progress: RichProgress):
    """The spec a `--submit` run goes ahead with, checked before any work: an entry is
    compared only with entries on the same utterances, so with no --limit/--utterance-ids the
    run scores the committed entries' utterances, and a run on other ones is refused now
    rather than after it has run (`qbench validate` would reject its entry)."""
    from qbench.data.librispeech import find_data_dir, list_utterances
    from qbench.run import select_utterances

    if spec.model is None:
        # a leaderboard lists registered models only; weights alone are named after the run
        raise CliError("--submit needs --model NAME (a registered model, see qbench models): weights no card names "
                       "cannot be entered; nothing was run")
    committed = committed_utterances(root, spec.model, spec.subset)
    if committed is None:
        return spec
    ids, source = committed
    if spec.utterance_ids is None and spec.limit is None:
        progress.note(f"--submit: scoring the {len(ids)} utterances of the committed entries ({source}), "
                      "so the new entry is compared with them")
        return spec.model_copy(update={"utterance_ids": tuple(ids)})
    if spec.utterance_ids is not None:
        wanted = set(spec.utterance_ids)
    else:
        data_dir = find_data_dir(spec.data_dir, spec.subset)
        wanted = {u.id for u in select_utterances(list_utterances(data_dir, spec.subset), spec.limit, None)}
    if wanted != set(ids):
        how = f"--limit {spec.limit}" if spec.utterance_ids is None else "--utterance-ids"
        raise CliError(f"--submit: this run ({how}) would score {len(wanted)} utterances, other than the {len(ids)} of the "
                       f"committed entries ({source}), and `qbench validate` rejects an entry on other utterances; "
                       f"nothing was run (leave out {how.split()[0]} to score theirs)")
    return spec


def submission_problems(entry, root: Path, data_dir: Path | None) -> list[str]:
    """What `qbench validate` would report about `entry` once written under `root`, found with
    validate's own checks on a scratch copy of its table (the committed entries of its model
    and subset, with `entry` in its place): the entry alone (against the references too, when
    `data_dir` has them), then across the table. Paths are given as they would be under `root`."""
    import shutil

    from qbench.leaderboard.entry import write_entry
    from qbench.leaderboard.validate import check_entry, check_leaderboards

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        target = write_entry(scratch, entry)
        table = root / entry.model.name / entry.dataset.subset
        for path in sorted(table.glob("*.json")) if table.is_dir() else []:
            if path.name != target.name and path.is_file() and not path.is_symlink():
                shutil.copyfile(path, target.parent / path.name)
        _, problems = check_entry(target, scratch, data_dir)
        if not problems:
            _, _, across = check_leaderboards(scratch)
            problems = [p for p in across if str(target) in p]
    return [p.replace(str(scratch), str(root)) for p in problems]


def submit_entry(result, root: Path) -> Path:
    """Write the run's leaderboard entry, unless `qbench validate` would reject it."""
    from qbench.leaderboard.entry import entry_from_result, write_entry

    entry = entry_from_result(result, result.devices_fitted or [])
    problems = submission_problems(entry, root, Path(result.dataset.data_dir))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CliError(f"--submit: no entry written, `qbench validate` would reject it: {problems[0]}{more}")
    path = write_entry(root, entry)
    say(f"leaderboard entry written to {path} (checked as `qbench validate` checks it); "
        "run `qbench leaderboard` and open a pull request")
    return path


#: The memory words `fit`, `run` and the leaderboard page share (README "Memory" says the same).
#: weights: every stored parameter buffer (packed codes, scales, unquantized tensors), in flash
#: or RAM; weights in RAM: 0 where the device executes them in place; working peak: what the
#: model allocates at its peak; total RAM: weights in RAM + working peak, what the verdict uses.
VERDICT_NOTE = ("* the fit verdict: total RAM = weights in RAM + working peak must be at most the device's RAM, "
                "and the weights at most its storage")


def print_device_summary(device: dict, lean: bool = False) -> None:
    """The device part of a result: the fit verdict, the memory it rests on, the compute.
    `lean`: a run with quantized activations, budgeted by the lean runtime's memory model alone."""
    b, profile, c = device["breakdown"], device["profile"], device["compute"]
    measured = device.get("measured_peak_bytes")
    # the verdict takes the larger of the two working peaks (qbench.embedded.memory.check_fit),
    # or with quantized activations the lean runtime's alone
    total = b["weights_ram_bytes"] + (b["working_peak_bytes"] if lean else max(b["working_peak_bytes"], measured or 0))
    if lean:
        note = (f"{VERDICT_NOTE}; with quantized activations the working peak is the lean embedded runtime's memory "
                "model (activations and KV cache at their stored precision, one window at a time); the measured "
                "column is the numpy emulation's own tracemalloc peak (float32 and float64 buffers, integer codes "
                "kept as float32), which is not what the device holds and does not enter the verdict.")
    else:
        note = (f"{VERDICT_NOTE}; during a run the working peak is the larger of the estimate (the model's memory model "
                f"at batch {device.get('batch_size') or 1}, with {_mib(b.get('cache_bytes', 0))} MiB of whole layers "
                "cached in float where the RAM leaves room; `qbench fit` counts batch 1 and no cache) and the measurement "
                "(tracemalloc, per batch).")
    show_table(
        f"memory on {profile['name']} ({profile['part']}), batch {device.get('batch_size') or 1}",
        ["weights MiB", "weights in RAM MiB", "working peak estimated MiB",
         "emulation measured MiB" if lean else "working peak measured MiB", "total RAM* MiB", "device RAM MiB", "fits"],
        [[_mib(b["weights_stored_bytes"]), _mib(b["weights_ram_bytes"]), _mib(b["working_peak_bytes"]), _mib(measured),
          _mib(total), _mib(profile["ram_bytes"]), "yes" if device["fits"] else "no"]],
        notes=[note],
    )
    show_table("compute on the device", ["MACs G", "bit ops T", "wall s"],
               [[f"{c['total_macs'] / 1e9:.2f}", f"{c['total_bit_ops'] / 1e12:.2f}", f"{c['wall_seconds']:.1f}"]])


def print_summary(result) -> None:
    m = result.metrics
    show_table(
        f"{result.model.name} on {result.dataset.subset}",
        ["WER %", "CER %", "utterances", "audio s", "wall s", "RTFx", "weights MiB", "peak RSS MiB"],
        [[f"{100 * m.wer:.2f}", f"{100 * m.cer:.2f}", str(m.utterances), f"{m.audio_seconds:.1f}", f"{m.wall_seconds:.1f}",
          f"{m.rtfx:.1f}", _mib(m.model_bytes), _mib(m.peak_rss_bytes)]],
        notes=["peak RSS is the whole process (Python, numpy, libraries, the float weights before packing), "
               "not a device figure; RTFx = audio s / wall s."],
    )


# ------------------------------------------------------------------------------------------------
# qbench models / download
# ------------------------------------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> int:
    from qbench.checkpoints.registry import (
        WeightsNotFoundError,
        registered_models,
        registry_problems,
        resolve_weights,
    )

    rows = []
    for name, registered in registered_models().items():
        card = registered.card
        try:
            where = str(resolve_weights(card)[0])
        except WeightsNotFoundError:
            where = "-"
        rows.append([name, card.architecture, f"{card.parameters:,}", registered.origin, where])
    show_table("registered models", ["name", "architecture", "parameters", "from", "weights here"], rows, left_columns=5)
    for problem in registry_problems():
        say(f"model card problem: {problem}", "red")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    import json as _json

    from qbench.embedded.devices import discover_device_profiles
    from qbench.plugin_manager import discover_activation_schemes, discover_quantizers

    entries, errors = discover_quantizers()
    schemes, scheme_errors = discover_activation_schemes()
    # a device-profile hook can fail too; import failures are in every list, print them once
    errors += [e for e in discover_device_profiles()[1] + scheme_errors if e not in errors]
    if args.show:
        e = entries.get(args.show) or schemes.get(args.show)
        if e is None:
            raise CliError(f"unknown quantizer or activation scheme {args.show!r}; available: "
                           f"{', '.join(list(entries) + list(schemes)) or 'none'}")
        # plugin-supplied text is printed as it is, never read as markup
        out.print(Text(f"{e.name} {e.version} from {e.distribution or e.plugin} {e.distribution_version or ''}".strip(),
                       style="bold"))
        out.print(Text(e.description))
        rows = []
        for key, prop in e.config_schema.get("properties", {}).items():
            kind = prop.get("type") or " | ".join(p.get("type", "?") for p in prop.get("anyOf", []))
            if "enum" in prop:
                kind = " | ".join(map(str, prop["enum"]))
            rows.append([key, str(kind), _json.dumps(prop.get("default")), prop.get("description", "")])
        how = "--act NAME --act-set" if args.show in schemes and args.show not in entries else "--plugin NAME --set"
        show_table(f"config (qbench run {how} KEY=VALUE ...)", ["key", "type", "default", "description"], rows,
                   left_columns=4, prose_columns=(1, 3))
        return 0
    rows = []
    for e in entries.values():
        dist = f"{e.distribution} {e.distribution_version}" if e.distribution else e.plugin
        rows.append([e.name, e.version, dist, "yes" if e.needs_calibration else "no",
                     ", ".join(e.config_schema.get("properties", {})), e.description])
    show_table("quantizer plugins", ["name", "version", "distribution", "calibrated", "config keys", "description"], rows,
               left_columns=6, prose_columns=(2, 4, 5))
    rows = []
    for e in schemes.values():
        dist = f"{e.distribution} {e.distribution_version}" if e.distribution else e.plugin
        rows.append([e.name, e.version, dist, ", ".join(e.config_schema.get("properties", {})), e.description])
    show_table("activation schemes (qbench run --act NAME; absmax8 = absmax at 8 bits)",
               ["name", "version", "distribution", "config keys", "description"], rows, left_columns=5, prose_columns=(2, 3, 4))
    for err in errors:
        say(f"plugin error: {err}", "red")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    """Per-device fits / does not fit for a (quantized) model, from the accountant alone."""
    import json as _json

    from qbench.checkpoints.loader import load_model
    from qbench.embedded.devices import get_device_profile, get_device_profiles
    from qbench.embedded.session import fit_audio, fit_model

    model = load_model(args.model, args.weights).model
    args.model = model.name  # --weights alone: the name the checkpoint is known by
    if args.encoder_seconds is not None:
        model = model.with_encoder_seconds(args.encoder_seconds)
    devices = [get_device_profile(args.device)] if args.device else list(get_device_profiles().values())
    if args.ladder:
        return fit_ladder_table(model, devices, args.json)
    quantization = None
    if args.plugin:
        model, quantization = quantize_for_fit(model, args)
    activations = None
    choice = activations_from_args(args)
    if choice is not None:
        from qbench.quant.plugin_process import ActivationSchemeProcess

        with ActivationSchemeProcess(choice.name, choice.config) as scheme:
            activations = scheme.record(choice.kv_cache, None)
    reports = [fit_model(model, device, activations=activations) for device in devices]
    if args.json:
        print(_json.dumps({"model": args.model, "quantization": quantization,
                           "devices": [r.model_dump(mode="json") for r in reports]}, indent=2))
        return 0
    rows = []
    for r in reports:
        b, p = r.breakdown, r.profile
        rows.append([p.name, _mib(p.ram_bytes), _mib(p.storage_bytes), "yes" if p.weights_execute_in_place else "no",
                     _mib(b.weights_stored_bytes), _mib(b.weights_ram_bytes), _mib(b.working_peak_bytes),
                     _mib(b.total_ram_bytes), Text("yes", style="green") if r.fits else Text("no", style="red")])
    act = f" {activations.label} (lean runtime)" if activations is not None else ""
    show_table(
        f"{args.model} {args.plugin or 'as stored'} {' '.join(args.set or [])}{act}: {fit_audio(model)}, batch 1",
        ["device", "device RAM MiB", "storage MiB", "XIP", "weights MiB", "weights in RAM MiB", "working peak MiB",
         "total RAM* MiB", "fits"],
        rows, left_columns=1,
        notes=[f"{VERDICT_NOTE}. XIP devices execute the weights in place from flash, so none are in RAM. The working "
               f"peak is the model's memory model for {fit_audio(model)}; `qbench run` also measures it and may cache "
               "whole layers where RAM is left, so its working peak is larger."],
    )
    if quantization and quantization.get("estimated_with"):
        say(f"note: {quantization['estimated_with']}")
    return 0


def fit_ladder_table(model, devices, as_json: bool) -> int:
    """`qbench fit --ladder`: per device rung, the best configuration that fits and what binds."""
    import json as _json

    from qbench.embedded.fit_ladder import CONFIGURATIONS, ladder_fits

    rungs = ladder_fits(model, devices)
    if as_json:
        print(_json.dumps([r.model_dump(mode="json") for r in rungs], indent=2))
        return 0
    rows = []
    for r in rungs:
        p, b = r.device, r.best
        best = Text("none", style="red") if b is None else b.configuration.label
        rows.append([p.name, _mib(p.ram_bytes), _mib(p.storage_bytes), "yes" if p.weights_execute_in_place else "no", best,
                     "" if b is None else _mib(b.weights_bytes),
                     "" if b is None else f"{_mib(b.working_peak_bytes)} ({b.peak_phase})",
                     f"{r.fitting}/{len(CONFIGURATIONS)}", r.binding or "nothing: the best configuration fits"])
    show_table(
        f"{model.name}: the best configuration each device fits (batch 1)",
        ["device", "RAM MiB", "storage MiB", "XIP", "best configuration", "weights MiB", "working peak MiB",
         "fit", "binding constraint (the next better configuration)"],
        rows, left_columns=1, prose_columns=(8,),
        notes=["Configurations, best first: weights as stored (fp16), then 8.25, 4.25, 3.25 and 2.25 bits per parameter "
               "(embedding included); for each, encoder windows of the model's default, 10 s and 5 s; for each, "
               "activations float32 (the numpy implementation's memory model), then A8, A8 with an 8-bit KV cache, A4 "
               "with a 4-bit KV cache (a lean embedded runtime's memory model, `SpeechModel.lean_memory`)."],
    )
    return 0


def policy_from_args(args: argparse.Namespace):
    """Which layers to quantize and how the harness corrects them (`--quantize-embeddings`, `--lowrank`)."""
    from pydantic import ValidationError

    from qbench.quant.apply import QuantizationPolicy
    from qbench.quant.lowrank import LowRankCorrection

    rank = getattr(args, "lowrank", None)
    if rank is None and getattr(args, "lowrank_dtype", None) not in (None, "float16"):
        raise CliError("--lowrank-dtype stores a low-rank correction: give --lowrank RANK too")
    try:
        lowrank = None if rank is None else LowRankCorrection(rank=rank, dtype=args.lowrank_dtype or "float16")
    except ValidationError as exc:
        raise CliError(f"--lowrank: {exc.errors()[0]['msg']} (got {rank})") from None
    return QuantizationPolicy(quantize_embeddings=args.quantize_embeddings, lowrank=lowrank)


def quantize_for_fit(model, args: argparse.Namespace):
    """Quantize without audio, with any installed quantizer (a calibrated one runs on neutral
    statistics: exact sizes, uncalibrated codes; see `quantize_without_audio`)."""
    from qbench.plugin_manager import get_quantizer
    from qbench.quant.apply import quantize_without_audio
    from qbench.quant.settings import parse_settings

    cls = get_quantizer(args.plugin)
    config = parse_settings(args.set or [], cls.Config, plugin=args.plugin)
    policy = policy_from_args(args)
    model, report = quantize_without_audio(model, cls(config), policy)
    record = report.model_dump(mode="json", exclude={"layers"})
    record["estimated_with"] = report.calibration_note
    return model, record


def cmd_validate(args: argparse.Namespace) -> int:
    from qbench.data.librispeech import DataNotFoundError, find_data_dir
    from qbench.leaderboard.validate import validate_leaderboards

    data_dir = None
    if not args.no_references:
        try:
            data_dir = find_data_dir(args.data_dir)
        except DataNotFoundError:
            say("LibriSpeech references not found: checking entries against themselves only")
    n, problems = validate_leaderboards(Path(args.leaderboards), data_dir)
    # the verdict goes to stdout, one problem a line, so CI logs and scripts can read it
    for problem in problems:
        print(f"invalid: {one_line(problem)}")
    print(f"{n} entries checked: " + (f"{len(problems)} problem(s)" if problems else "all valid"))
    return 1 if problems else 0


def cmd_verify(args: argparse.Namespace) -> int:
    from qbench.leaderboard.verify import verify_entry

    failed = 0
    for entry in args.entries:
        say(f"verifying {entry}: rerunning it as it was made")
        progress = RerunProgress(quiet=False)
        try:
            report = verify_entry(Path(entry), args.data_dir, progress)
        except QBenchError as exc:  # an unreadable entry fails alone; the others are still rerun
            failed += 1
            say(f"not reproduced {entry}: {one_line(exc)}", "red")
            continue
        finally:
            progress.close()
        if report.reproduced:
            say(f"reproduced {entry}: WER {100 * report.wer_rerun:.2f} %, same hypotheses", "green")
        else:
            failed += 1
            for problem in report.problems:
                say(f"not reproduced {entry}: {problem}", "red")
    return 1 if failed else 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from qbench.quant.sensitivity import draw_heatmap, parse_candidate, run_sensitivity

    candidates = [parse_candidate(c) for c in (args.candidate or DEFAULT_CANDIDATES)]
    output = Path(args.output or f"results/sensitivity/{args.model or 'model'}.json")
    table = run_sensitivity(args.model, args.weights, candidates, args.data_dir, output, args.subset, args.count,
                            args.plugin_timeout, progress=None if args.quiet else say)
    names = list(table.float_bytes)
    rows = [[n] + [f"{c.layers[n].kl:.4f}" if n in c.layers else "-" for c in table.candidates] for n in names]
    groups = sorted({g for c in table.candidates for g in c.groups})
    rows += [[f"[{g}]"] + [f"{c.groups[g]:.4f}" if g in c.groups else "-" for c in table.candidates] for g in groups]
    rows.append(["[all layers]"] + [f"{c.uniform_kl:.4f}" for c in table.candidates])
    rows.append(["dev WER %"] + [f"{100 * c.uniform_wer:.2f}" for c in table.candidates])
    show_table(f"KL of quantizing each layer alone ({table.subset}, {len(table.utterance_ids)} utterances, "
               f"{table.positions} positions; float WER {100 * table.float_wer:.2f} %)",
               ["layer"] + table.labels(), rows, left_columns=1,
               notes=["KL(p_float || p_quantized) per scored position, nats; [group]: all its layers at once"])
    say(f"sensitivity table written to {output}")
    if args.heatmap:
        say(f"heat map written to {draw_heatmap(table, Path(args.heatmap))}")
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    from qbench.quant.allocation import FLOAT, allocate, plan_of, predict_wer
    from qbench.quant.plan import write_plan
    from qbench.quant.sensitivity import read_table

    table = read_table(Path(args.sensitivity))
    if args.device:
        from qbench.quant.plugin_process import device_profiles_from_plugins

        profiles, _ = device_profiles_from_plugins(None)
        if args.device not in profiles:
            raise CliError(f"unknown device {args.device!r} (qbench fit lists them)")
        budget = profiles[args.device].storage_bytes
        what = f"{args.device}'s storage ({budget / 2**20:.1f} MiB)"
    elif args.max_bytes:
        budget, what = args.max_bytes, f"{args.max_bytes} bytes"
    else:
        raise CliError("give --device NAME or --max-bytes N: the budget to allocate bits for")
    allocation = allocate(table, budget, args.candidate or None, allow_float=not args.no_float,
                          keep_float=args.keep_float or ())
    name = args.name or f"{table.model}-{args.device or args.max_bytes}"
    plan = plan_of(allocation, table, name)
    path = write_plan(plan, Path(args.plan_output or f"plans/{name}.json"))
    counts: dict[str, int] = {}
    for label in allocation.choice.values():
        counts[label] = counts.get(label, 0) + 1
    params = sum(table.float_bytes.values()) // 2  # the float layers are float16: 2 bytes a weight
    predicted = predict_wer(table, allocation.predicted_kl)
    show_table(f"plan {name} for {what}", ["candidate", "layers"], [[k, str(v)] for k, v in counts.items()],
               left_columns=1, notes=[
                   f"model bytes {allocation.model_bytes} of {budget} ({8 * (allocation.model_bytes - table.fixed_bytes) / params:.2f} "
                   f"bits per quantizable weight, embedding included); summed KL {allocation.predicted_kl:.4f}; "
                   f"predicted {table.subset} WER {100 * predicted:.2f} % (float {100 * table.float_wer:.2f} %)",
                   f"'{FLOAT}': kept at its stored precision"])
    if not args.run:
        say(f"plan written to {path}; run it with: qbench run --plan {path}")
        return 0
    # the plan runs as `qbench run --plan` would run it: same result file, entry and checks
    output = Path(args.output or f"results/{table.model}__{args.subset}__plan-{name}.json")
    argv = ["run", "--model", table.model, "--plan", str(path), "--subset", args.subset, "--output", str(output),
            "--device", args.run_device or args.device or "pi-zero-2w"]
    for flag, value in (("--limit", args.limit), ("--utterance-ids", args.utterance_ids), ("--threads", args.threads),
                        ("--data-dir", args.data_dir), ("--leaderboards", args.leaderboards), ("--weights", args.weights)):
        if value is not None:
            argv += [flag, str(value)]
    argv += ["--submit"] if args.submit else []
    code = main(argv + (["--quiet"] if args.quiet else []))
    if code != 0:
        return code
    metrics = json.loads(output.read_text())["metrics"]
    show_table(f"plan {name}: predicted and measured", ["", "WER %"], [
        [f"predicted ({table.subset}, from summed KL)", f"{100 * predicted:.2f}"],
        [f"float ({table.subset}, measured utterances)", f"{100 * table.float_wer:.2f}"],
        [f"measured ({args.subset}, {metrics['utterances']} utterances)", f"{100 * metrics['wer']:.2f}"],
    ], left_columns=1)
    return 0


DEFAULT_CANDIDATES = ["rtn bits=8", "rtn bits=4", "rtn bits=3", "rtn bits=2"]


def cmd_errors(args: argparse.Namespace) -> int:
    from qbench.data.librispeech import find_data_dir
    from qbench.leaderboard.entry import entry_label, read_entry
    from qbench.leaderboard.error_analysis import analyse_entry, references

    entries = [(path, read_entry(Path(path))) for path in args.entries]
    refs: dict[tuple[str, str], dict[str, str]] = {}
    rows = []
    for path, entry in entries:
        key = (entry.dataset.subset, "")
        if key not in refs:
            data_dir = find_data_dir(args.data_dir, entry.dataset.subset)
            all_ids = {u.id for _, e in entries if e.dataset.subset == entry.dataset.subset for u in e.utterances}
            refs[key] = references(data_dir, entry.dataset.subset, all_ids)
        b = analyse_entry(entry, refs[key])
        pct = (lambda n: f"{100 * n / b.words:.2f}") if b.words else (lambda n: "-")
        rows.append([entry_label(entry.quantizer), f"{100 * b.wer:.2f}", pct(b.substitutions), pct(b.deletions),
                     pct(b.insertions), str(b.empty_hypotheses), str(b.truncated_hypotheses),
                     str(b.looping_hypotheses), f"{100 * b.errors_in_loops:.0f}", str(b.utterances)])
    show_table("error kinds", ["entry", "WER %", "sub %", "del %", "ins %", "empty", "cut short", "loops",
                               "errors in loops %", "utts"], rows, left_columns=1,
               notes=["sub/del/ins: % of reference words; cut short: hypothesis under half the reference's length; "
                      "loops: a 1-4-gram repeated 4 times in a row"])
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from qbench.leaderboard.page import render_leaderboard

    for path in render_leaderboard(Path(args.leaderboards)):
        say(f"wrote {path}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from qbench.data.librispeech import default_cache_dir, download_subset

    root = download_subset(args.subset, Path(args.cache_dir) if args.cache_dir else default_cache_dir(), progress=not args.quiet)
    say(f"{args.subset} is in {root}")
    return 0


def cmd_download_model(args: argparse.Namespace) -> int:
    from qbench.checkpoints.download import download_model
    from qbench.checkpoints.registry import get_card

    path = download_model(get_card(args.model), kind=args.source, progress=not args.quiet)
    say(f"{args.model} weights are in {path} (checked against the registry); "
                  f"`qbench run --model {args.model}` finds them")
    return 0


def _default_device() -> str:
    from qbench.embedded.devices import DEFAULT_DEVICE

    return DEFAULT_DEVICE


# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qbench", description=__doc__)
    parser.add_argument("--version", action="version", version=f"qbench {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of any error")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="transcribe a LibriSpeech subset, score it, write a result file")
    run.add_argument("--model", default=None, help="registered model name (qbench models; default whisper-tiny.en, "
                     "or with --weights alone, whatever checkpoint those are)")
    run.add_argument("--weights", help="weights path (file or directory): the named model's weights instead of the "
                     "registry's sources, or alone any Whisper or wav2vec2 checkpoint (shape read from its own files)")
    run.add_argument("--subset", default="test-clean")
    run.add_argument("--limit", type=int, help="first N utterances in sorted id order")
    run.add_argument("--utterance-ids", metavar="FILE",
                     help="exactly these utterances (one id a line, or a leaderboard entry's) instead of --limit")
    run.add_argument("--data-dir", help="folder holding LibriSpeech/ (default: QBENCH_DATA_DIR, ../shared/librispeech, cache)")
    run.add_argument("--batch-size", type=int, default=None, help="utterances per batch (default 8; on a device the largest of 1, 2, 4, 8 that fits its RAM)")
    run.add_argument("--device", default=_default_device(), help="emulated target (qbench fit lists them) or 'none'")
    run.add_argument("--plugin", help="quantizer name (qbench plugins); none = float baseline")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="quantizer config, repeatable")
    run.add_argument("--quantize-embeddings", action="store_true", help="also quantize embeddings / tied output projection")
    run.add_argument("--plan", metavar="FILE", help="a quantization plan (TOML or JSON: a quantizer, or float, per "
                     "layer; qbench optimize writes one) instead of --plugin")
    run.add_argument("--lowrank", type=int, metavar="RANK",
                     help="add a rank-RANK correction of every quantized layer's error (W ~ Q + U V; harness-computed, "
                          "activation-aware when the plugin calibrates)")
    run.add_argument("--lowrank-dtype", choices=["float16", "int8"], help="storage of the low-rank factors (default float16)")
    add_activation_arguments(run)
    run.add_argument("--encoder-seconds", type=float, metavar="S", help="audio per encoder pass: Whisper windows of S "
                     "seconds instead of 30 (whisper.cpp's audio_ctx), wav2vec2 chunks of S seconds")
    add_calibration_arguments(run)
    run.add_argument("--output", "-o", help="result JSON path (default results/<model>__<subset>__<label>.json)")
    run.add_argument("--force", action="store_true", help="start afresh even if the output holds a result (of this "
                     "run or another): the old file is kept aside as <name>.<UTC time>.json")
    run.add_argument("--artifact", metavar="FILE", help="evaluate a quantized-model artifact (qbench quantize) "
                     "instead of quantizing with --plugin")
    run.add_argument("--plugin-timeout", type=float, metavar="SECONDS",
                     help="seconds the plugin's process may take per layer before it is killed (default 600)")
    run.add_argument("--threads", type=int, help="threads to run on (default: QBENCH_THREADS, else every CPU); "
                     "results are the same on any count")
    run.add_argument("--quiet", "-q", action="store_true")
    run.add_argument("--submit", action="store_true", help="also write a leaderboard entry into --leaderboards")
    run.add_argument("--leaderboards", default="leaderboards", help="leaderboard root for --submit")
    run.set_defaults(func=cmd_run)

    quantize = sub.add_parser("quantize", help="quantize a model with a plugin (in its own process) into an artifact file")
    quantize.add_argument("--model", default=None, help="as for qbench run")
    quantize.add_argument("--weights")
    quantize.add_argument("--plugin", required=True, help="quantizer name (qbench plugins)")
    quantize.add_argument("--set", action="append", metavar="KEY=VALUE", help="quantizer config, repeatable")
    quantize.add_argument("--quantize-embeddings", action="store_true")
    quantize.add_argument("--plan", metavar="FILE", help="a quantization plan instead of --plugin")
    quantize.add_argument("--lowrank", type=int, metavar="RANK",
                     help="add a rank-RANK correction of every quantized layer's error (W ~ Q + U V; harness-computed, "
                          "activation-aware when the plugin calibrates)")
    quantize.add_argument("--lowrank-dtype", choices=["float16", "int8"], help="storage of the low-rank factors (default float16)")
    add_activation_arguments(quantize)
    quantize.add_argument("--data-dir", help="folder holding LibriSpeech/ with the calibration subset")
    add_calibration_arguments(quantize)
    quantize.add_argument("--plugin-timeout", type=float, metavar="SECONDS")
    quantize.add_argument("--threads", type=int)
    quantize.add_argument("--output", "-o", dest="artifact_output",
                          help="artifact path (default results/<model>__<plugin>_<settings>.safetensors)")
    quantize.add_argument("--quiet", "-q", action="store_true")
    quantize.set_defaults(func=cmd_quantize, subset="test-clean", limit=None, utterance_ids=None, device="none",
                          batch_size=None, output=None, artifact=None)

    sweep = sub.add_parser("sweep", help="run a grid of runs (plugins x settings x models x subsets), each point "
                           "sharded by utterance over a local process pool or a Ray cluster; resumable")
    sweep.add_argument("spec", nargs="?", metavar="SPEC", help="a sweep file (.toml or .json: [base], [grid], "
                       "[[points]]; README, Sweeps)")
    sweep.add_argument("--grid", nargs="+", metavar="KEY=V1,V2", help="axes, every combination a point: RunSpec fields "
                       "(plugin, model, subset, device, batch_size, ...) or quantizer settings (bits=2,3,4); "
                       "plugin=none is the float baseline")
    sweep.add_argument("--name", help="the sweep's name (default: the file's stem, or grid-<digest of the grid>)")
    sweep.add_argument("--out", metavar="DIR", help="the sweep's folder (default results/sweeps/<name>); running the "
                       "same sweep into it again resumes it")
    sweep.add_argument("--model", help="as for qbench run, for every point")
    sweep.add_argument("--weights")
    sweep.add_argument("--subset")
    sweep.add_argument("--limit", type=int, help="first N utterances in sorted id order")
    sweep.add_argument("--utterance-ids", metavar="FILE", help="exactly these utterances (one id a line, or an entry's)")
    sweep.add_argument("--data-dir")
    sweep.add_argument("--device", help="emulated target or 'none' (default: qbench run's)")
    sweep.add_argument("--batch-size", type=int)
    sweep.add_argument("--calibration-subset")
    sweep.add_argument("--calibration-limit", type=int)
    sweep.add_argument("--calibration-ids", metavar="FILE")
    sweep.add_argument("--calibration-data-dir", metavar="DIR")
    sweep.add_argument("--plugin-timeout", type=float, metavar="SECONDS")
    sweep.add_argument("--shards", type=int, metavar="K", help="utterance shards per point (default: one per worker); "
                       "shards are whole batches, so results are the same for any K")
    sweep.add_argument("--workers", type=int, metavar="W", help="tasks at once (local default: one per core, fewer "
                       "when the memory holds fewer workers)")
    sweep.add_argument("--threads", type=int, help="threads per task (default: the cores shared among the workers)")
    sweep.add_argument("--executor", choices=["local", "ray"], default="local",
                       help="a local process pool (default) or a Ray cluster (pip install 'qbench[ray]')")
    sweep.add_argument("--address", help="with --executor ray: the cluster's address (ray start --head prints it; "
                       "'auto' finds a local one); default: start a local Ray instance")
    sweep.add_argument("--quiet", "-q", action="store_true")
    sweep.set_defaults(func=cmd_sweep)

    fit = sub.add_parser("fit", help="which device profiles a (quantized) model fits, without running audio")
    fit.add_argument("--model", default=None, help="as for qbench run")
    fit.add_argument("--weights")
    fit.add_argument("--plugin", help="quantizer name; none = the weights as stored")
    fit.add_argument("--set", action="append", metavar="KEY=VALUE")
    fit.add_argument("--quantize-embeddings", action="store_true")
    fit.add_argument("--lowrank", type=int, metavar="RANK",
                     help="add a rank-RANK correction of every quantized layer's error (W ~ Q + U V; harness-computed, "
                          "activation-aware when the plugin calibrates)")
    fit.add_argument("--lowrank-dtype", choices=["float16", "int8"], help="storage of the low-rank factors (default float16)")
    fit.add_argument("--device", help="only this profile")
    add_activation_arguments(fit)
    fit.add_argument("--encoder-seconds", type=float, metavar="S", help="audio per encoder pass (as for qbench run)")
    fit.add_argument("--ladder", action="store_true", help="for each device, the best of a grid of weight bits, "
                     "activation bits, KV-cache bits and encoder windows that fits, and what binds")
    fit.add_argument("--json", action="store_true", help="print JSON instead of a table")
    fit.set_defaults(func=cmd_fit)

    models = sub.add_parser("models", help="list registered models, where each card came from and whether its "
                            "weights are here")
    models.set_defaults(func=cmd_models)

    validate = sub.add_parser("validate", help="check every leaderboard entry (schema, names, digests, WER)")
    validate.add_argument("--leaderboards", default="leaderboards")
    validate.add_argument("--data-dir", help="LibriSpeech location, to recheck error counts against the references")
    validate.add_argument("--no-references", action="store_true", help="self-consistency checks only")
    validate.set_defaults(func=cmd_validate)

    verify = sub.add_parser("verify", help="rerun leaderboard entries and check they reproduce")
    verify.add_argument("entries", nargs="+", metavar="ENTRY")
    verify.add_argument("--data-dir")
    verify.set_defaults(func=cmd_verify)

    sensitivity = sub.add_parser("sensitivity", help="the damage (output KL) of quantizing each layer alone, per "
                                 "candidate, measured on dev-clean; cached")
    sensitivity.add_argument("--model", default="whisper-tiny.en")
    sensitivity.add_argument("--weights")
    sensitivity.add_argument("--candidate", action="append", metavar="'PLUGIN KEY=VALUE ...'",
                             help=f"repeatable (default: {'; '.join(DEFAULT_CANDIDATES)})")
    sensitivity.add_argument("--subset", default="dev-clean", help="where damage is measured (never the evaluation set)")
    sensitivity.add_argument("--count", type=int, default=8, help="utterances measured; the rest of the subset calibrates")
    sensitivity.add_argument("--data-dir")
    sensitivity.add_argument("--output", "-o", help="the table (default results/sensitivity/<model>.json); "
                             "candidates already in it are not measured again")
    sensitivity.add_argument("--heatmap", metavar="PNG", help="also draw layers x candidates as a heat map")
    sensitivity.add_argument("--plugin-timeout", type=float)
    sensitivity.add_argument("--quiet", "-q", action="store_true")
    sensitivity.set_defaults(func=cmd_sensitivity)

    optimize = sub.add_parser("optimize", help="choose a candidate (or float) per layer for the least summed KL "
                              "within a device's storage or a byte budget (exact integer program); writes a plan")
    optimize.add_argument("--sensitivity", required=True, metavar="TABLE", help="from qbench sensitivity")
    optimize.add_argument("--device", help="budget: this device profile's storage")
    optimize.add_argument("--max-bytes", type=int, help="budget in bytes (all weights, never-quantized ones included)")
    optimize.add_argument("--candidate", action="append", metavar="LABEL", help="only these of the table's candidates")
    optimize.add_argument("--no-float", action="store_true", help="every layer must be quantized")
    optimize.add_argument("--keep-float", action="append", metavar="GLOB",
                          help="layers that stay float whatever the budget (repeatable), e.g. decoder.token_embedding")
    optimize.add_argument("--name", help="the plan's name (default <model>-<budget>)")
    optimize.add_argument("--plan-output", metavar="FILE", help="default plans/<name>.json")
    optimize.add_argument("--run", action="store_true", help="then run the plan (as qbench run --plan) and print "
                          "predicted against measured WER")
    optimize.add_argument("--subset", default="test-clean", help="with --run: the evaluation subset")
    optimize.add_argument("--limit", type=int)
    optimize.add_argument("--utterance-ids", metavar="FILE")
    optimize.add_argument("--run-device", help="with --run: the device to run on (default --device, else pi-zero-2w)")
    optimize.add_argument("--threads", type=int)
    optimize.add_argument("--weights", help="with --run: the weights path, if not the registry's")
    optimize.add_argument("--data-dir")
    optimize.add_argument("--output", "-o", help="with --run: the result file")
    optimize.add_argument("--submit", action="store_true", help="with --run: also write a leaderboard entry")
    optimize.add_argument("--leaderboards")
    optimize.add_argument("--quiet", "-q", action="store_true")
    optimize.set_defaults(func=cmd_optimize)

    errors = sub.add_parser("errors", help="what kind of errors entries make: substitutions, deletions, insertions, "
                            "empty, cut-short and looping hypotheses")
    errors.add_argument("entries", nargs="+", metavar="ENTRY")
    errors.add_argument("--data-dir", help="LibriSpeech location (for the reference transcripts)")
    errors.set_defaults(func=cmd_errors)

    leaderboard = sub.add_parser("leaderboard", help="render leaderboards/README.md, its charts and the entry schema")
    leaderboard.add_argument("--leaderboards", default="leaderboards")
    leaderboard.set_defaults(func=cmd_leaderboard)

    plugins = sub.add_parser("plugins", help="list discovered quantizer plugins (and any that failed to load)")
    plugins.add_argument("--show", metavar="NAME", help="show one quantizer's config schema")
    plugins.set_defaults(func=cmd_plugins)

    download = sub.add_parser("download", help="download an official LibriSpeech subset into the cache")
    download.add_argument("subset")
    download.add_argument("--cache-dir")
    download.add_argument("--quiet", "-q", action="store_true")
    download.set_defaults(func=cmd_download)

    download_model = sub.add_parser("download-model", help="download a registered model's weights (checked against its card)")
    download_model.add_argument("model", help="registered model name (qbench models)")
    download_model.add_argument("--source", choices=["huggingface", "url"], help="which of the card's sources (default: the first)")
    download_model.add_argument("--quiet", "-q", action="store_true")
    download_model.set_defaults(func=cmd_download_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        say("interrupted", "red")
        return 130
    except (QBenchError, OSError) as exc:
        # qbench's own failures and the file system's are the user's to fix: one line. Anything
        # else is a bug in qbench (or a library) and keeps its traceback.
        if args.debug:
            raise
        say(f"error: {one_line(exc) or type(exc).__name__}", "red")
        return 2


if __name__ == "__main__":
    sys.exit(main())
