"""The `fashion-gan` command line: submit and manage training jobs, datasets and samples.

Heavy modules (torch, boto3, the Docker SDK) are imported inside the commands that need them,
so `fashion-gan --help` and `fashion-gan status` start quickly.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fashion_gan.errors import ConfigError, FashionGanError, RunnerError
from fashion_gan.runner import RunOptions, backend_for_job, submit_job
from fashion_gan.runner.backend import JobState, JobStatus, get_backend
from fashion_gan.runner.jobs import JOB_ID_PATTERN, default_jobs_dir, list_records, load_record, utc_now

log = logging.getLogger(__name__)

# Locals are hidden in tracebacks of unexpected errors: they can hold credentials from the environment.
app = typer.Typer(help="Train a DCGAN on fashion images, FloydHub style.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)
data_app = typer.Typer(help="Versioned datasets in object storage.", no_args_is_help=True)
metrics_app = typer.Typer(help="Evaluation metrics.", no_args_is_help=True)
runs_app = typer.Typer(help="Training runs in the output storage.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(metrics_app, name="metrics")
app.add_typer(runs_app, name="runs")

console = Console()
error_console = Console(stderr=True)
# Width of tables written to a pipe or file, where rich would otherwise assume 80 columns and cut cells.
PIPED_TABLE_WIDTH = 200


def print_table(table: Table) -> None:
    if console.is_terminal:
        console.print(table)
    else:
        Console(width=PIPED_TABLE_WIDTH).print(table)

FloydFileOption = Annotated[Path, typer.Option("--file", "-f", help="Job spec file (FloydHub floyd.yml format).")]


def _machine_flag(gpu: bool, cpu: bool, machine: str | None) -> str | None:
    chosen = [name for name, given in (("gpu", gpu), ("cpu", cpu), (machine, machine is not None)) if given]
    if len(chosen) > 1:
        raise ConfigError(f"conflicting machine options {', '.join(map(str, chosen))}: give one of --gpu, --cpu, --machine")
    return chosen[0] if chosen else None


@app.command()
def run(
    hydra_overrides: Annotated[list[str] | None, typer.Argument(
        help="Hydra overrides appended to the training command (put them after --).")] = None,
    task: Annotated[str | None, typer.Option(help="Task block of floyd.yml to use.")] = None,
    gpu: Annotated[bool, typer.Option("--gpu", help="Run on one GPU.")] = False,
    cpu: Annotated[bool, typer.Option("--cpu", help="Run on CPU only.")] = False,
    machine: Annotated[str | None, typer.Option(help="Machine: cpu, gpu or gpuN (N GPUs).")] = None,
    data: Annotated[list[str] | None, typer.Option(
        help="Input SOURCE:DEST (dataset NAME/N, jobs/<id> or a URI); repeat for several; replaces floyd.yml input.")] = None,
    backend: Annotated[str | None, typer.Option(help="Backend: local, docker or sagemaker.")] = None,
    message: Annotated[str | None, typer.Option("--message", "-m", help="Job description.")] = None,
    follow: Annotated[bool, typer.Option(help="Stream the job's log until it ends.")] = False,
    floyd_file: FloydFileOption = Path("floyd.yml"),
) -> None:
    """Submit a training job and print its id."""
    options = RunOptions(task=task, machine=_machine_flag(gpu, cpu, machine), inputs=data or None,
                         backend=backend, description=message, hydra_overrides=list(hydra_overrides or []))
    job_backend, spec = submit_job(floyd_file, options)
    typer.echo(spec.job_id)
    if follow:
        _follow_to_end(job_backend, spec.job_id)


def _follow_to_end(job_backend, job_id: str) -> None:
    for line in job_backend.logs(job_id, follow=True):
        typer.echo(line)
    status = job_backend.status(job_id)
    if status.state is not JobState.SUCCEEDED:
        reason = f": {status.failure_reason}" if status.failure_reason else ""
        raise RunnerError(f"job {job_id} {status.state.value}{reason}; see `fashion-gan logs {job_id}`")
    error_console.print(f"job {job_id} succeeded", soft_wrap=True)


def _format_time(value: datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M") if value else "-"


def _format_duration(status: JobStatus) -> str:
    if status.started_at is None:
        return "-"
    seconds = int(((status.finished_at or utc_now()) - status.started_at).total_seconds())
    hours, rest = divmod(max(seconds, 0), 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {seconds:02d}s" if hours else f"{minutes}m {seconds:02d}s"


_STATE_STYLES = {JobState.SUCCEEDED: "green", JobState.FAILED: "red", JobState.TIMED_OUT: "red",
                 JobState.STOPPED: "yellow", JobState.RUNNING: "cyan", JobState.QUEUED: "blue"}


def _new_status_table() -> Table:
    table = Table()
    for column in ("id", "backend", "state", "created", "duration", "machine"):
        table.add_column(column, no_wrap=True)  # ids and times stay copyable on narrow terminals
    table.add_column("description")
    return table


def _add_status_row(table: Table, status: JobStatus) -> None:
    style = _STATE_STYLES.get(status.state, "")
    table.add_row(status.job_id, status.backend, f"[{style}]{status.state.value}[/]", _format_time(status.created_at),
                  _format_duration(status), status.machine, escape(status.description))


def _add_unknown_row(table: Table, record) -> None:
    table.add_row(record.spec.job_id, record.backend, "[magenta]unknown[/]", _format_time(record.created_at), "-",
                  record.spec.machine.name, escape(record.spec.description))


def _status_of_record(record) -> JobStatus | str:
    """Return a job's status, or the error text when its backend cannot be queried (the listing goes on)."""
    try:
        return get_backend(record.backend, record.spec.backend_options, default_jobs_dir()).status(record.spec.job_id)
    except FashionGanError as err:
        log.warning("failed to query job %s: %s", record.spec.job_id, err)
        return str(err)


@app.command()
def status(job: Annotated[str | None, typer.Argument(help="Job id; all jobs when omitted.")] = None) -> None:
    """Show the state of one job or of every job, newest first."""
    table = _new_status_table()
    if job is not None:
        job_status = backend_for_job(job).status(job)
        _add_status_row(table, job_status)
        print_table(table)
        _print_reasons([job_status])
        return

    records = list(list_records(default_jobs_dir()))
    if not records:
        console.print(f"no jobs in {default_jobs_dir()}; submit one with `fashion-gan run`")
        return
    results = [(record, _status_of_record(record)) for record in records]
    for record, result in results:
        if isinstance(result, JobStatus):
            _add_status_row(table, result)
        else:
            _add_unknown_row(table, record)
    print_table(table)
    _print_reasons([result for _, result in results if isinstance(result, JobStatus)])
    for record, result in results:
        if isinstance(result, str):
            console.print(f"{record.spec.job_id}: status unknown: {escape(result)}", soft_wrap=True)


def _print_reasons(statuses: list[JobStatus]) -> None:
    for item in statuses:
        if item.failure_reason:
            console.print(f"{item.job_id}: {escape(item.failure_reason)}", soft_wrap=True)


@app.command()
def logs(job: Annotated[str, typer.Argument(help="Job id.")],
         follow: Annotated[bool, typer.Option(help="Keep printing until the job ends.")] = False) -> None:
    """Print a job's log."""
    for line in backend_for_job(job).logs(job, follow=follow):
        typer.echo(line)


@app.command()
def stop(job: Annotated[str, typer.Argument(help="Job id.")],
         grace_period_s: Annotated[float, typer.Option(min=0.0, help="Seconds between SIGTERM and SIGKILL.")] = 30.0,
         ) -> None:
    """Stop a job: SIGTERM (the job saves a checkpoint), then SIGKILL after the grace period."""
    job_backend = backend_for_job(job)
    job_backend.stop(job, grace_period_s=grace_period_s)
    console.print(f"{job}: {job_backend.status(job).state.value}")


@app.command()
def restart(job: Annotated[str, typer.Argument(help="Job id.")],
            follow: Annotated[bool, typer.Option(help="Stream the job's log until it ends.")] = False) -> None:
    """Run a stopped or failed job again under the same id; training resumes from its latest checkpoint."""
    job_backend = backend_for_job(job)
    job_backend.restart(job)
    typer.echo(job)
    if follow:
        _follow_to_end(job_backend, job)


@app.command()
def output(job: Annotated[str, typer.Argument(help="Job id.")],
           dest: Annotated[Path, typer.Option(help="Folder to download into.")] = Path(".")) -> None:
    """Download a job's outputs (checkpoints, samples, metrics) into DEST/<job id>."""
    if dest.exists() and not dest.is_dir():
        raise RunnerError(f"--dest {dest} is a file; give a folder to download the outputs of {job} into.")
    typer.echo(str(backend_for_job(job).outputs(job, dest)))


def _checkpoint_path(reference: str, cache_dir: Path) -> Path:
    """Return a local checkpoint file for a local path, a storage URI or a job id (its latest checkpoint)."""
    from fashion_gan.storage import open_store

    if JOB_ID_PATTERN.match(reference):
        from fashion_gan.run_outputs import read_latest_pointer, run_prefix

        record = load_record(default_jobs_dir(), reference)
        store = open_store(record.spec.output_uri)
        pointer = read_latest_pointer(store, reference)
        if pointer is None:
            raise RunnerError(f"job {reference} has no verified checkpoint yet; check `fashion-gan status {reference}`")
        key = f"{run_prefix(reference)}/{pointer.key}"
        return store.download_file(key, cache_dir / reference / Path(pointer.key).name,
                                   expected_size=pointer.size, expected_sha256=pointer.sha256)
    if "://" in reference and not reference.startswith("file://"):
        parent, _, name = reference.rstrip("/").rpartition("/")
        return open_store(parent).download_file(name, cache_dir / name)
    path = Path(reference.removeprefix("file://"))
    if not path.is_file():
        # Checked here, before `generate` pays seconds for importing torch.
        raise ConfigError(f"checkpoint not found: {path}. Pass a .ckpt file, a storage URI or a job id")
    return path


@app.command()
def generate(
    checkpoint: Annotated[str, typer.Option(help="Checkpoint: a local .ckpt, a storage URI or a job id.")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of images in the grid.")] = 64,
    out: Annotated[Path, typer.Option(help="PNG file to write.")] = Path("grid.png"),
    interpolate: Annotated[int | None, typer.Option(
        min=2, help="Write a strip of this many images interpolated between two latent points instead of a grid.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the latent noise.")] = 0,
) -> None:
    """Generate images from a trained generator."""
    from fashion_gan.runner.jobs import fashion_gan_home

    checkpoint_path = _checkpoint_path(checkpoint, fashion_gan_home() / "checkpoints")
    from fashion_gan.sampling import interpolation_strip, load_generator, sample_grid, save_grid_png

    generator = load_generator(checkpoint_path)
    if interpolate is not None:
        images = interpolation_strip(generator, interpolate, seed)
        path = save_grid_png(images, out, nrow=interpolate)
    else:
        path = save_grid_png(sample_grid(generator, n, seed), out)
    typer.echo(str(path))


def _default_storage() -> str:
    """Return the dataset storage: $FASHION_GAN_STORAGE, else `output` of ./floyd.yml, else ./outputs."""
    from fashion_gan.runner.spec import DEFAULT_OUTPUT, load_floyd_config, resolve_output_uri

    configured = os.environ.get("FASHION_GAN_STORAGE")
    if configured:
        return configured
    if Path("floyd.yml").is_file():
        config = load_floyd_config("floyd.yml")
        return resolve_output_uri(config.top.get("output", DEFAULT_OUTPUT), config.base_dir)
    return str(Path(DEFAULT_OUTPUT).resolve())


StorageOption = Annotated[str | None, typer.Option(
    help="Storage root (s3://bucket/prefix or a folder); default $FASHION_GAN_STORAGE, else `output` of floyd.yml.")]


@data_app.command("upload")
def data_upload(directory: Annotated[Path, typer.Argument(help="Folder of images to upload.")],
                name: Annotated[str, typer.Option(help="Dataset name.")],
                storage: StorageOption = None) -> None:
    """Upload a folder as the next version of a dataset and print NAME/VERSION."""
    from fashion_gan.storage import open_store
    from fashion_gan.storage.datasets import upload_dataset

    version = upload_dataset(open_store(storage or _default_storage()), directory, name)
    typer.echo(f"{name}/{version}")


@data_app.command("list")
def data_list(name: Annotated[str | None, typer.Argument(help="Dataset name; all datasets when omitted.")] = None,
              storage: StorageOption = None) -> None:
    """List datasets and their versions."""
    from fashion_gan.storage import open_store
    from fashion_gan.storage.datasets import list_versions

    versions = list_versions(open_store(storage or _default_storage()), name)
    if not versions:
        console.print(f"no dataset {name!r}" if name else "no datasets; upload one with `fashion-gan data upload`")
        return
    table = Table("dataset", "version", "state", "files", "size (MB)", "created")
    for item in versions:
        table.add_row(item.name, str(item.version), item.state, str(item.file_count),
                      f"{item.total_bytes / 1e6:.1f}", item.created)
    print_table(table)


@metrics_app.command("train-features")
def metrics_train_features(
    out: Annotated[Path | None, typer.Option(help="Folder for the weights; default: the package's weights folder.")] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 4,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    data_dir: Annotated[Path | None, typer.Option(help="Fashion-MNIST folder; default: the installed copy.")] = None,
) -> None:
    """Train the Fashion-MNIST feature classifier used by the FID-style metrics."""
    from fashion_gan.metrics.train_features import train_feature_classifier

    out_dir = out or Path(__file__).resolve().parent / "metrics" / "weights"
    weights_path, accuracy = train_feature_classifier(out_dir, epochs=epochs, seed=seed, data_dir=data_dir)
    typer.echo(f"{weights_path} (test accuracy {accuracy:.4f})")


RunsStorageOption = Annotated[str | None, typer.Option(
    "--storage", help="Output storage that contains runs/<id>/ (s3://bucket/prefix or a folder); "
    "default $FASHION_GAN_STORAGE, else `output` of floyd.yml, else ./outputs.")]


@runs_app.command("list")
def runs_list(storage: RunsStorageOption = None) -> None:
    """List the runs in the output storage, newest first, with their final and best FID."""
    from fashion_gan.runs import list_runs
    from fashion_gan.storage import open_store

    store = open_store(storage or _default_storage())
    runs = list_runs(store)
    if not runs:
        console.print(f"no runs in {escape(store.describe('runs'))}; train one with `python train.py` or `fashion-gan run`",
                      soft_wrap=True)
        return
    table = Table(title=escape(store.describe("runs")))
    for column in ("id", "state", "experiment", "steps", "val/fid", "best val/fid", "images/s", "finished"):
        table.add_column(column, no_wrap=True)
    for record in runs:
        summary = record.summary or {}
        table.add_row(record.run_id, record.state, escape(str(record.config.get("run", {}).get("experiment", "-"))),
                      _cell(summary.get("steps")), _cell(summary.get("val_fid")), _cell(summary.get("val_fid_best")),
                      _cell(summary.get("images_per_s")), escape(str(summary.get("finished_at", "-"))))
    print_table(table)


def _cell(value) -> str:
    from fashion_gan.runs import format_value

    return escape(format_value(value))


@runs_app.command("compare")
def runs_compare(
    run_ids: Annotated[list[str], typer.Argument(help="Run ids to compare.")],
    storage: RunsStorageOption = None,
    plot: Annotated[Path | None, typer.Option(help="PNG file for the loss and FID curves of all runs.")] = None,
    samples: Annotated[Path | None, typer.Option(
        help="PNG file with each run's final sample grid side by side.")] = None,
) -> None:
    """Compare runs: the config keys that differ, final and best metrics, and throughput."""
    from fashion_gan.runs import comparison_rows, compose_samples, load_run, plot_curves
    from fashion_gan.storage import open_store

    store = open_store(storage or _default_storage())
    runs = [load_run(store, run_id) for run_id in dict.fromkeys(run_ids)]
    table = Table(title=escape(store.describe("runs")))
    table.add_column("", no_wrap=True)
    for record in runs:
        table.add_column(record.run_id, no_wrap=True)
    for label, cells in comparison_rows(runs):
        table.add_row(escape(label), *(escape(cell) for cell in cells))
    print_table(table)
    if plot is not None:
        typer.echo(str(plot_curves(runs, plot)))
    if samples is not None:
        typer.echo(str(compose_samples(store, runs, samples)))


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; a FashionGanError prints its message without a traceback and exits with its code."""
    logging.basicConfig(level=os.environ.get("FASHION_GAN_LOG_LEVEL", "WARNING").upper(),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        app(args=argv, prog_name="fashion-gan")
    except FashionGanError as err:
        error_console.print(f"[bold red]error:[/] {escape(str(err))}", soft_wrap=True)
        raise SystemExit(err.exit_code) from None


if __name__ == "__main__":
    main()
