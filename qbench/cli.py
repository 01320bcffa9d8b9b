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


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def default_output(model: str, subset: str, label: str) -> Path:
    return Path("results") / f"{model}__{subset}__{label}.json"


# ------------------------------------------------------------------------------------------------
# qbench run
# ------------------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from qbench.checkpoints.loader import load_model
    from qbench.data.librispeech import find_data_dir, list_utterances, utterance_digest
    from qbench.evaluate import RunFailed, evaluate
    from qbench.results import DatasetRef, MachineInfo, ModelRef, RunResult

    if args.threads is not None:
        if args.threads < 1:
            raise CliError(f"--threads must be at least 1, got {args.threads}")
        from qbench.models import parallel

        parallel.THREADS = args.threads
    data_dir = find_data_dir(args.data_dir, args.subset)
    all_present = list_utterances(data_dir, args.subset)
    utterances = select_utterances(all_present, args.limit, args.utterance_ids)
    loaded = load_model(args.model, args.weights)
    model = loaded.model

    quantization = calibration = None
    label = "fp"
    if args.plugin:
        model, quantization, calibration = quantize_for_run(model, args, data_dir, {u.id for u in utterances})
        label = args.plugin + "".join(f"_{s.replace('=', '')}" for s in (args.set or []))
    session = device_session_for_run(model, args)

    from qbench.data.librispeech import OFFICIAL_COUNTS

    result = RunResult(
        model=ModelRef(name=loaded.card.name, architecture=loaded.card.architecture, format=loaded.format,
                       path=str(loaded.path), sha256=loaded.sha256, parameters=loaded.card.parameters),
        dataset=DatasetRef(subset=args.subset, data_dir=str(data_dir), limit=args.limit,
                           utterance_count=len(utterances), utterance_ids_sha256=utterance_digest(u.id for u in utterances),
                           partial_subset=len(all_present) < OFFICIAL_COUNTS.get(args.subset, 0)),
        quantization=quantization, calibration=calibration, machine=MachineInfo.current(),
        device=session.record() if session else None,
    )
    output = Path(args.output) if args.output else default_output(args.model, args.subset, label)
    if session is not None and not session.fits:
        return device_does_not_fit(session, result, output)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=args.quiet) as progress:
        task = progress.add_task(f"{args.model} {label} {args.subset}", total=len(utterances))
        try:
            evaluate(session.model if session else model, utterances, result, output, batch_size=args.batch_size,
                     on_batch=lambda n, _wall: progress.advance(task, n))
        except RunFailed as exc:
            if session is not None and session.exceeded:
                return device_does_not_fit(session, exc.result, output)
            done = len(exc.result.utterances)
            raise CliError(f"{exc} ({done} utterances finished are saved in {output})") from None
    print_summary(result)
    if session is not None:
        result.device = session.record()
        result.write(output)
        print_device_summary(session)
    console.print(f"result written to [bold]{output}[/bold]")
    if args.submit:
        submit_entry(model, result, Path(args.leaderboards))
    return 0


def submit_entry(model, result, root: Path) -> Path:
    """Write the run's leaderboard entry, with the device profiles the model fits by the same
    accounting `qbench fit` uses."""
    from qbench.embedded.devices import get_device_profiles
    from qbench.embedded.session import fit_model
    from qbench.leaderboard.entry import entry_from_result, write_entry

    fitted = [name for name, device in get_device_profiles().items() if fit_model(model, device).fits]
    path = write_entry(root, entry_from_result(result, fitted))
    console.print(f"leaderboard entry written to [bold]{path}[/bold]; run `qbench leaderboard` and open a pull request")
    return path


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


def select_utterances(present: list, limit: int | None, ids_file: str | None) -> list:
    """`--limit N` (first N sorted ids) or `--utterance-ids FILE` (exactly those, one id a line:
    how `qbench verify` reruns an entry on a full official download as on the shared sample)."""
    if ids_file is None:
        if limit is not None and limit < 1:
            raise CliError(f"--limit must be at least 1, got {limit}")
        return present[:limit] if limit is not None else present
    wanted = read_ids(ids_file, "scored")
    by_id = {u.id: u for u in present}
    missing = [i for i in wanted if i not in by_id]
    if missing:
        raise CliError(f"{ids_file}: {len(missing)} of {len(wanted)} utterances are not in the data (e.g. {missing[0]})")
    return sorted((by_id[i] for i in set(wanted)), key=lambda u: u.id)


def quantize_for_run(model, args: argparse.Namespace, data_dir: Path, eval_ids: set[str]):
    """Quantize `model` with `--plugin` / `--set`; calibrate on audio disjoint from `eval_ids`."""
    from qbench.data.calibration import load_calibration
    from qbench.plugin_manager import get_quantizer
    from qbench.quant.apply import QuantizationPolicy, parse_settings, quantize_model

    cls = get_quantizer(args.plugin)
    quantizer = cls(parse_settings(args.set or [], cls.Config, plugin=args.plugin))
    policy = QuantizationPolicy(quantize_embeddings=args.quantize_embeddings)
    audios, calibration = None, None
    if quantizer.needs_calibration:
        ids = read_ids(args.calibration_ids, "calibration") if args.calibration_ids else None
        audios, record = load_calibration(data_dir, args.calibration_subset, args.calibration_limit, eval_ids, ids)
        calibration = record.model_dump()
        console.print(f"calibrating {args.plugin} on {record.utterance_count} {record.subset} utterances ({record.audio_seconds:.0f} s)")
    with Progress(TextColumn("[bold]quantizing[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, disable=args.quiet) as progress:
        task = progress.add_task(args.plugin, total=len(policy.select(model.quantizable_weights())))
        report_progress = lambda name, done, total: progress.update(task, completed=done, description=name)  # noqa: E731
        model, report = quantize_model(model, quantizer, policy, audios, progress=report_progress)
    return model, report.model_dump(mode="json"), calibration


def device_session_for_run(model, args: argparse.Namespace):
    """The run's `DeviceSession` (`--device`, default the embedded default), or None for `none`.

    On a device the batch size is 1 unless given: an MCU transcribes one utterance at a time.
    """
    from qbench.embedded.devices import NO_DEVICE, get_device_profile
    from qbench.embedded.session import DeviceSession

    if args.device == NO_DEVICE:
        args.batch_size = args.batch_size or 8
        return None
    args.batch_size = args.batch_size or 1
    return DeviceSession(model, get_device_profile(args.device), args.batch_size)


def device_does_not_fit(session, result, output: Path) -> int:
    """Record the run as not fitting (not as a crash) and print the one-line verdict; exit 3."""
    result.status, result.error = "failed", session.report.reason
    result.device = session.record()
    result.write(output)
    console.print(f"[red]{session.report.reason}[/red]", highlight=False, soft_wrap=True)
    console.print(f"result written to [bold]{output}[/bold] (device.fits = false)")
    return 3


def print_device_summary(session) -> None:
    r, c = session.report, session.compute()
    b = r.breakdown
    table = Table(title=f"on {r.profile.name} ({r.profile.part})")
    for col in ("fits", "weights stored", "weights in RAM", "peak est.", "peak measured", "RAM", "MACs", "bit ops", "wall s"):
        table.add_column(col, justify="right")
    table.add_row("yes" if r.fits else "no", _fmt_bytes(b.weights_stored_bytes), _fmt_bytes(b.weights_ram_bytes),
                  _fmt_bytes(b.working_peak_bytes), _fmt_bytes(r.measured_peak_bytes), _fmt_bytes(r.profile.ram_bytes),
                  f"{c.total_macs / 1e9:.2f} G", f"{c.total_bit_ops / 1e12:.2f} T", f"{c.wall_seconds:.1f}")
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

    from qbench.plugin_manager import discover_quantizers

    entries, errors = discover_quantizers()
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
        console.print(f"[red]plugin error:[/red] {err}", highlight=False)
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
        console.print(f"note: {quantization['estimated_with']}")
    return 0


def quantize_for_fit(model, args: argparse.Namespace):
    """Quantize without audio. A calibrated quantizer's size is estimated with RTN at the same
    `bits` and `group_size`: packed size depends on the code width and scale layout, not on how
    calibration chose the codes (exact for GPTQ-style uniform grids)."""
    from qbench.plugin_manager import get_quantizer
    from qbench.quant.apply import QuantizationPolicy, parse_settings, quantize_model

    cls = get_quantizer(args.plugin)
    config = parse_settings(args.set or [], cls.Config, plugin=args.plugin)
    note = None
    if cls.needs_calibration:
        rtn = get_quantizer("rtn")
        keys = {k: v for k, v in config.model_dump().items() if k in ("bits", "group_size")}
        config, cls = rtn.Config(**keys), rtn
        note = f"'{args.plugin}' needs calibration audio; sizes estimated with rtn {keys}"
    policy = QuantizationPolicy(quantize_embeddings=args.quantize_embeddings)
    model, report = quantize_model(model, cls(config), policy)
    record = report.model_dump(mode="json", exclude={"layers"})
    record["estimated_with"] = note
    return model, record


def cmd_validate(args: argparse.Namespace) -> int:
    from qbench.data.librispeech import DataNotFoundError, find_data_dir
    from qbench.leaderboard.validate import validate_leaderboards

    data_dir = None
    if not args.no_references:
        try:
            data_dir = find_data_dir(args.data_dir)
        except DataNotFoundError:
            console.print("LibriSpeech references not found: checking entries against themselves only")
    n, problems = validate_leaderboards(Path(args.leaderboards), data_dir)
    for problem in problems:
        console.print(f"[red]invalid:[/red] {problem}", highlight=False, soft_wrap=True)
    console.print(f"{n} entries checked, {len(problems)} problem(s)")
    return 1 if problems else 0


def cmd_verify(args: argparse.Namespace) -> int:
    from qbench.leaderboard.verify import verify_entry

    failed = 0
    for entry in args.entries:
        report = verify_entry(Path(entry), args.data_dir, main)
        if report.reproduced:
            console.print(f"[green]reproduced[/green] {entry}: WER {100 * report.wer_rerun:.2f} %, same hypotheses", highlight=False)
        else:
            failed += 1
            for problem in report.problems:
                console.print(f"[red]not reproduced[/red] {entry}: {problem}", highlight=False, soft_wrap=True)
    return 1 if failed else 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from qbench.leaderboard.page import render_leaderboard

    for path in render_leaderboard(Path(args.leaderboards)):
        console.print(f"wrote {path}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from qbench.data.librispeech import default_cache_dir, download_subset

    root = download_subset(args.subset, Path(args.cache_dir) if args.cache_dir else default_cache_dir(), progress=not args.quiet)
    console.print(f"{args.subset} is in {root}")
    return 0


def cmd_download_model(args: argparse.Namespace) -> int:
    from qbench.checkpoints.download import download_model
    from qbench.checkpoints.registry import get_card

    path = download_model(get_card(args.model), kind=args.source, progress=not args.quiet)
    console.print(f"{args.model} weights are in {path} (checked against the registry); "
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
    run.add_argument("--threads", type=int, help="threads to run on (default: QBENCH_THREADS, else every CPU); "
                     "results are the same on any count")
    run.add_argument("--quiet", "-q", action="store_true")
    run.add_argument("--submit", action="store_true", help="also write a leaderboard entry into --leaderboards")
    run.add_argument("--leaderboards", default="leaderboards", help="leaderboard root for --submit")
    run.set_defaults(func=cmd_run)

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
        console.print("interrupted", style="red", markup=False)
        return 130
    except (QBenchError, OSError) as exc:
        # qbench's own failures and the file system's are the user's to fix: one line. Anything
        # else is a bug in qbench (or a library) and keeps its traceback.
        if args.debug:
            raise
        console.print(f"error: {one_line(exc) or type(exc).__name__}", style="red", markup=False,
                      highlight=False, soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
