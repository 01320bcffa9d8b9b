"""The `qbench` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

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
            columns = (TextColumn("[bold]quantizing[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn())
            self._start("quantizing", columns, layer, total)
        self._bar.update(self._task, completed=done, description=layer)

    def transcribing(self, description: str, total: int) -> None:
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn())
        self._start("transcribing", columns, description, total)

    def transcribed(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        self._bar, self._phase = None, None


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

    from qbench.quant.apply import QuantizationPolicy
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
            policy=QuantizationPolicy(quantize_embeddings=args.quantize_embeddings),
            calibration_subset=args.calibration_subset, calibration_limit=args.calibration_limit,
            calibration_ids=read_ids(args.calibration_ids, "calibration") if args.calibration_ids else None,
            artifact=getattr(args, "artifact", None), plugin_timeout=args.plugin_timeout,
            threads=args.threads, batch_size=args.batch_size, output=args.output,
        )
    except ValidationError as exc:
        raise CliError(str(spec_error(exc, "qbench run"))) from None


def cmd_run(args: argparse.Namespace) -> int:
    import signal
    import threading

    from qbench.evaluate import RunFailed, RunInterrupted
    from qbench.run import run_benchmark

    def stop(signum: int, _frame) -> None:
        # SIGTERM (a scheduler, `kill`) ends the run as Ctrl-C does: the result file records
        # `interrupted` and the journal stays for the next run to resume from
        raise RunInterrupted(signum)

    spec = spec_from_args(args)
    progress = RichProgress(args.quiet)
    stopping = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    previous = {signum: signal.signal(signum, stop) for signum in stopping}
    try:
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
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if result.device is not None and not result.device["fits"]:
        say(result.error, "red")
        say(f"result written to {spec.output_path} (device.fits = false)")
        return 3
    print_summary(result)
    if result.device is not None:
        print_device_summary(result.device)
    say(f"result written to {spec.output_path}")
    if args.submit:
        submit_entry(result, Path(args.leaderboards))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from qbench.run import quantize_to_artifact

    spec = spec_from_args(args)
    target = Path(args.artifact_output) if args.artifact_output else Path("results") / f"{spec.model}__{spec.label}.safetensors"
    progress = RichProgress(args.quiet)
    try:
        path, record = quantize_to_artifact(spec, target, progress)
    finally:
        progress.close()
    say(f"{record['quantizer']} {record['quantizer_version']}: {record['mean_bits_per_weight']:.2f} bits per quantized "
        f"weight, model {_fmt_bytes(record['model_bytes'])}; `qbench run --artifact {path}` evaluates it")
    return 0


def submit_entry(result, root: Path) -> Path:
    """Write the run's leaderboard entry."""
    from qbench.leaderboard.entry import entry_from_result, write_entry

    path = write_entry(root, entry_from_result(result, result.devices_fitted or []))
    say(f"leaderboard entry written to {path}; run `qbench leaderboard` and open a pull request")
    return path


def print_device_summary(device: dict) -> None:
    """The device part of a result: the fit verdict, the memory it rests on, the compute."""
    b, profile, c = device["breakdown"], device["profile"], device["compute"]
    table = Table(title=f"on {profile['name']} ({profile['part']})")
    for col in ("fits", "weights stored", "weights in RAM", "peak est.", "peak measured", "RAM", "MACs", "bit ops", "wall s"):
        table.add_column(col, justify="right")
    table.add_row("yes" if device["fits"] else "no", _fmt_bytes(b["weights_stored_bytes"]), _fmt_bytes(b["weights_ram_bytes"]),
                  _fmt_bytes(b["working_peak_bytes"]), _fmt_bytes(device.get("measured_peak_bytes")),
                  _fmt_bytes(profile["ram_bytes"]), f"{c['total_macs'] / 1e9:.2f} G", f"{c['total_bit_ops'] / 1e12:.2f} T",
                  f"{c['wall_seconds']:.1f}")
    out.print(table)


def print_summary(result) -> None:
    m = result.metrics
    table = Table(title=f"{result.model.name} on {result.dataset.subset}")
    for col in ("WER", "CER", "utterances", "audio s", "wall s", "RTF", "RTFx", "model bytes", "peak RSS"):
        table.add_column(col, justify="right")
    table.add_row(f"{100 * m.wer:.2f} %", f"{100 * m.cer:.2f} %", str(m.utterances), f"{m.audio_seconds:.1f}",
                  f"{m.wall_seconds:.1f}", f"{m.rtf:.3f}", f"{m.rtfx:.1f}", _fmt_bytes(m.model_bytes), _fmt_bytes(m.peak_rss_bytes))
    out.print(table)


# ------------------------------------------------------------------------------------------------
# qbench models / download
# ------------------------------------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> int:
    from qbench.checkpoints.registry import (
        WeightsNotFoundError,
        list_models,
        resolve_weights,
    )

    table = Table(title="registered models")
    for col in ("name", "architecture", "parameters", "weights here"):
        table.add_column(col)
    for name, card in list_models().items():
        try:
            where = str(resolve_weights(card)[0])
        except WeightsNotFoundError:
            where = "-"
        table.add_row(name, card.architecture, f"{card.parameters:,}", where)
    out.print(table)
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    import json as _json

    from qbench.embedded.devices import discover_device_profiles
    from qbench.plugin_manager import discover_quantizers

    entries, errors = discover_quantizers()
    # a device-profile hook can fail too; import failures are in both lists, print them once
    errors += [e for e in discover_device_profiles()[1] if e not in errors]
    if args.show:
        if args.show not in entries:
            raise CliError(f"unknown quantizer {args.show!r}; available: {', '.join(entries) or 'none'}")
        e = entries[args.show]
        out.print(f"[bold]{e.name}[/bold] {e.version} from {e.distribution or e.plugin} {e.distribution_version or ''}")
        out.print(e.description)
        table = Table(title="config (qbench run --set KEY=VALUE)")
        for col in ("key", "type", "default", "description"):
            table.add_column(col)
        for key, prop in e.config_schema.get("properties", {}).items():
            kind = prop.get("type") or " | ".join(p.get("type", "?") for p in prop.get("anyOf", []))
            if "enum" in prop:
                kind = " | ".join(map(str, prop["enum"]))
            table.add_row(key, str(kind), _json.dumps(prop.get("default")), prop.get("description", ""))
        out.print(table)
        return 0
    table = Table(title="quantizer plugins")
    for col in ("name", "version", "distribution", "calibration", "config keys", "description"):
        table.add_column(col)
    for e in entries.values():
        dist = f"{e.distribution} {e.distribution_version}" if e.distribution else e.plugin
        table.add_row(e.name, e.version, dist, "yes" if e.needs_calibration else "no",
                      ", ".join(e.config_schema.get("properties", {})), e.description)
    out.print(table)
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
    quantization = None
    if args.plugin:
        model, quantization = quantize_for_fit(model, args)
    devices = [get_device_profile(args.device)] if args.device else list(get_device_profiles().values())
    reports = [fit_model(model, device) for device in devices]
    if args.json:
        print(_json.dumps({"model": args.model, "quantization": quantization,
                           "devices": [r.model_dump(mode="json") for r in reports]}, indent=2))
        return 0
    table = Table(title=f"{args.model} {args.plugin or 'as stored'} {' '.join(args.set or [])}: {fit_audio(model)}, batch 1")
    for col in ("device", "RAM", "storage", "XIP", "weights", "in RAM", "working peak", "total RAM", "fits"):
        table.add_column(col, justify="left" if col == "device" else "right", no_wrap=col == "device")
    for r in reports:
        b, p = r.breakdown, r.profile
        table.add_row(p.name, _fmt_bytes(p.ram_bytes), _fmt_bytes(p.storage_bytes), "yes" if p.weights_execute_in_place else "no",
                      _fmt_bytes(b.weights_stored_bytes), _fmt_bytes(b.weights_ram_bytes), _fmt_bytes(b.working_peak_bytes),
                      _fmt_bytes(b.total_ram_bytes), "[green]fits[/green]" if r.fits else "[red]no[/red]")
    out.print(table)
    if quantization and quantization.get("estimated_with"):
        say(f"note: {quantization['estimated_with']}")
    return 0


def quantize_for_fit(model, args: argparse.Namespace):
    """Quantize without audio, with any installed quantizer (a calibrated one runs on neutral
    statistics: exact sizes, uncalibrated codes; see `quantize_without_audio`)."""
    from qbench.plugin_manager import get_quantizer
    from qbench.quant.apply import QuantizationPolicy, quantize_without_audio
    from qbench.quant.settings import parse_settings

    cls = get_quantizer(args.plugin)
    config = parse_settings(args.set or [], cls.Config, plugin=args.plugin)
    policy = QuantizationPolicy(quantize_embeddings=args.quantize_embeddings)
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
        progress = RichProgress(quiet=False)
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
    run.add_argument("--model", default="whisper-tiny.en", help="registered model name (qbench models)")
    run.add_argument("--weights", help="weights path (file or directory) instead of the registry's sources")
    run.add_argument("--subset", default="test-clean")
    run.add_argument("--limit", type=int, help="first N utterances in sorted id order")
    run.add_argument("--utterance-ids", metavar="FILE",
                     help="exactly these utterances (one id a line, or a leaderboard entry's) instead of --limit")
    run.add_argument("--data-dir", help="folder holding LibriSpeech/ (default: QBENCH_DATA_DIR, ../shared/librispeech, cache)")
    run.add_argument("--batch-size", type=int, default=None, help="utterances per batch (default 8; 1 on a device)")
    run.add_argument("--device", default=_default_device(), help="emulated target (qbench fit lists them) or 'none'")
    run.add_argument("--plugin", help="quantizer name (qbench plugins); none = float baseline")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="quantizer config, repeatable")
    run.add_argument("--quantize-embeddings", action="store_true", help="also quantize embeddings / tied output projection")
    run.add_argument("--calibration-subset", default="dev-clean")
    run.add_argument("--calibration-limit", type=int, default=None)
    run.add_argument("--calibration-ids", metavar="FILE",
                     help="exactly these calibration utterances (one id a line, or a leaderboard entry's)")
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
    quantize.add_argument("--model", default="whisper-tiny.en")
    quantize.add_argument("--weights")
    quantize.add_argument("--plugin", required=True, help="quantizer name (qbench plugins)")
    quantize.add_argument("--set", action="append", metavar="KEY=VALUE", help="quantizer config, repeatable")
    quantize.add_argument("--quantize-embeddings", action="store_true")
    quantize.add_argument("--data-dir", help="folder holding LibriSpeech/ with the calibration subset")
    quantize.add_argument("--calibration-subset", default="dev-clean")
    quantize.add_argument("--calibration-limit", type=int, default=None)
    quantize.add_argument("--calibration-ids", metavar="FILE")
    quantize.add_argument("--plugin-timeout", type=float, metavar="SECONDS")
    quantize.add_argument("--threads", type=int)
    quantize.add_argument("--output", "-o", dest="artifact_output",
                          help="artifact path (default results/<model>__<plugin>_<settings>.safetensors)")
    quantize.add_argument("--quiet", "-q", action="store_true")
    quantize.set_defaults(func=cmd_quantize, subset="test-clean", limit=None, utterance_ids=None, device="none",
                          batch_size=None, output=None, artifact=None)

    fit = sub.add_parser("fit", help="which device profiles a (quantized) model fits, without running audio")
    fit.add_argument("--model", default="whisper-tiny.en")
    fit.add_argument("--weights")
    fit.add_argument("--plugin", help="quantizer name; none = the weights as stored")
    fit.add_argument("--set", action="append", metavar="KEY=VALUE")
    fit.add_argument("--quantize-embeddings", action="store_true")
    fit.add_argument("--device", help="only this profile")
    fit.add_argument("--json", action="store_true", help="print JSON instead of a table")
    fit.set_defaults(func=cmd_fit)

    models = sub.add_parser("models", help="list registered models and whether their weights are here")
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
