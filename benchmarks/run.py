"""Run every benchmark back to back and write benchmarks/RESULTS.md: `python -m benchmarks.run [--quick]`.

Each timed run happens in a fresh process, and the two sides of a comparison alternate within a
repeat, so slow drifts in machine load hit both. See benchmarks/RESULTS.md for the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import report
from benchmarks.common import BenchSettings, images_per_s, load_average, machine_facts, run_child, summarize
from benchmarks.fid_recipe import FID_RESULTS_PATH, FidSettings, bench_fid
from benchmarks.training import ALTERNATING_PUSH_INTERVAL, PUSH_EVERY_N_STEPS

log = logging.getLogger("benchmarks")

ALL_BENCHMARKS = ("training", "pipeline", "pull", "upload", "framework", "startup", "fid")
# Benchmarks that do not train on the photos of --data-dir.
FASHION_MNIST_BENCHMARKS = frozenset({"fid"})
# The fid benchmark trains two recipes for minutes each, which would take `make bench` past 15 minutes on
# 2 cores. So it runs only with `--only fid`, and a run without it reports the figures it recorded last.
DEFAULT_BENCHMARKS = tuple(name for name in ALL_BENCHMARKS if name != "fid")
DEFAULT_FID_SEEDS = "1,2,3,4,5"
RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"
QUICK_RESULTS_PATH = Path(tempfile.gettempdir()) / "fashion-gan-bench-quick.md"
QUICK_IMAGES_PER_CLASS = 8


def positive_int(text: str) -> int:
    """Parse a count argument: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: use a whole number of at least 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid count {value}: use a whole number of at least 1")
    return value


def seed_list(text: str) -> str:
    """Parse --fid-seeds: comma-separated whole numbers, returned without blanks."""
    seeds = [part.strip() for part in text.split(",") if part.strip()]
    if not seeds or not all(seed.isdigit() for seed in seeds):
        raise argparse.ArgumentTypeError(f"invalid seed list {text!r}: use comma-separated whole numbers such as 1,2,3")
    return ",".join(seeds)


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(DEFAULT_BENCHMARKS),
                        help=f"comma-separated benchmarks to run, from {', '.join(ALL_BENCHMARKS)} "
                             f"(default: {','.join(DEFAULT_BENCHMARKS)})")
    parser.add_argument("--repeats", type=positive_int, default=3, help="repetitions of every comparison")
    parser.add_argument("--warmup-steps", type=positive_int, default=3, help="training steps before timing starts")
    parser.add_argument("--measure-steps", type=positive_int, default=10, help="timed training steps per run")
    parser.add_argument("--upload-pushes", type=positive_int, default=10,
                        help=f"pushes counted in the upload-overhead run, one every {ALTERNATING_PUSH_INTERVAL} steps "
                             f"after a warm-up push; each adds {ALTERNATING_PUSH_INTERVAL} steps (about 27 s on 2 cores)")
    parser.add_argument("--framework-steps", type=positive_int, default=40,
                        help="timed steps of each framework-overhead run")
    parser.add_argument("--framework-rounds", type=positive_int, default=3,
                        help="rounds of the framework-overhead benchmark, each one Lightning run with a plain step after "
                             "each of its steps")
    parser.add_argument("--startup-repeats", type=positive_int, default=3, help="runs of the start-up benchmark")
    parser.add_argument("--fid-steps", type=positive_int, default=FidSettings.steps,
                        help="training steps of each recipe in the fid benchmark")
    parser.add_argument("--fid-seeds", type=seed_list, default=None,
                        help=f"comma-separated seeds of the fid benchmark, one run each "
                             f"(default: {DEFAULT_FID_SEEDS}; 1 with --quick)")
    parser.add_argument("--fid-samples", type=positive_int, default=FidSettings.num_samples,
                        help="generated (and real) images per FID score")
    parser.add_argument("--data-dir", default=BenchSettings.data_dir, help="folder of photos (class subfolders)")
    parser.add_argument("--work-dir", default="", help="scratch folder (default: a new temporary folder, removed after)")
    parser.add_argument("--output", default=None,
                        help=f"where to write the Markdown results (default: {RESULTS_PATH}, or {QUICK_RESULTS_PATH} "
                             "with --quick, so a harness check keeps the recorded figures)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings (32x32, 8 features, 2 steps, 1 repeat, 1 push) to check the harness "
                             "works; they replace the count and step arguments")
    arguments = parser.parse_args(argv)
    if arguments.quick:
        arguments.warmup_steps, arguments.measure_steps, arguments.repeats = 1, 2, 1
        arguments.upload_pushes, arguments.startup_repeats = 1, 1
        arguments.framework_steps, arguments.framework_rounds = 2, 1
        arguments.fid_steps, arguments.fid_samples = 2, 100
        arguments.fid_seeds = arguments.fid_seeds or "1"
    if arguments.output is None:
        arguments.output = str(QUICK_RESULTS_PATH if arguments.quick else RESULTS_PATH)
    return arguments


def settings_from(arguments: argparse.Namespace, work_dir: Path) -> BenchSettings:
    settings = BenchSettings(data_dir=arguments.data_dir, work_dir=str(work_dir), repeats=arguments.repeats,
                             warmup_steps=arguments.warmup_steps, measure_steps=arguments.measure_steps)
    if arguments.quick:
        settings.image_size, settings.generator_features, settings.discriminator_features = 32, 8, 8
        settings.batch_size, settings.latent_dim = 16, 16
        if Path(arguments.data_dir).is_dir():
            settings.data_dir = str(copy_photo_subset(Path(arguments.data_dir), work_dir / "photos",
                                                      QUICK_IMAGES_PER_CLASS))
    return settings


def copy_photo_subset(source_dir: Path, dest_dir: Path, per_class: int) -> Path:
    """Copy the first `per_class` files of each class folder, so a quick run pulls and decodes little."""
    for class_dir in sorted(path for path in source_dir.iterdir() if path.is_dir()):
        (dest_dir / class_dir.name).mkdir(parents=True, exist_ok=True)
        for path in sorted(class_dir.iterdir())[:per_class]:
            shutil.copyfile(path, dest_dir / class_dir.name / path.name)
    return dest_dir


def prepare_decoded_array(settings: BenchSettings) -> dict:
    """Build the decoded-array cache the project variants reuse; return how long the first build took."""
    from fashion_gan.data.cache import load_decoded_array

    started = time.perf_counter()
    decoded = load_decoded_array(settings.data_dir, kind="image_folder", channels=settings.channels,
                                 image_size=settings.image_size, cache_dir=Path(settings.work_dir) / "cache" / "decoded",
                                 show_progress=False)
    return {"images": int(len(decoded.array)), "build_s": time.perf_counter() - started,
            "skipped": len(decoded.skipped_files)}


def bench_training(settings: BenchSettings) -> dict:
    """End-to-end images/s (data loading included) of the project's defaults, its fp32 run and the reference."""
    variants = ("reference", "project", "project-fp32")
    rates: dict[str, list[float]] = {variant: [] for variant in variants}
    extras: dict[str, list[dict]] = {variant: [] for variant in variants}
    for repeat in range(settings.repeats):
        # Rotate the order, so no variant always runs first after the machine was idle.
        order = variants[repeat % 3:] + variants[:repeat % 3]
        for variant in order:
            log.info("training: %s, repeat %d", variant, repeat + 1)
            result = run_child("training", settings, variant)
            rates[variant].append(images_per_s(result["step_end_times"], settings.warmup_steps, settings.batch_size))
            extras[variant].append({"precision": result.get("precision"), "peak_rss_mb": result["peak_rss_mb"],
                                    "to_first_step_s": result["first_step_wall"] - result["spawned_at"]})
    return {"rates": {variant: summarize(values) for variant, values in rates.items()}, "extras": extras}


def bench_pipeline(settings: BenchSettings) -> dict:
    result = run_child("pipeline", settings)
    return {"project": summarize(result["project"]), "reference": summarize(result["reference"]),
            "project_batches": result["project_batches"], "reference_batches": result["reference_batches"]}


def bench_pull(settings: BenchSettings, s3_env: dict[str, str]) -> dict:
    result = run_child("pull", settings, env=s3_env)
    result["timings"] = {name: summarize(values) for name, values in result["timings"].items() if values}
    return result


def bench_upload(settings: BenchSettings, s3_env: dict[str, str], pushes: int) -> dict:
    """Train one run with a warm-up push and `pushes` counted ones, one every ALTERNATING_PUSH_INTERVAL steps.

    The run trains ALTERNATING_PUSH_INTERVAL * (pushes + 2) steps, so the last push period is followed
    by a push-free one. The first push's period does not count: it also pays the costs a run pays
    once, at its first checkpoint and sample grid. In seven traced runs it cost 8.4, 6.2, 14.0, -4.7,
    -0.1, 10.2 and 5.1 %, the later pushes -0.1 to 3.0 % on average.
    """
    from benchmarks.s3 import create_bucket

    upload_settings = BenchSettings.from_json(settings.to_json())
    upload_settings.measure_steps = ALTERNATING_PUSH_INTERVAL * (pushes + 2) - settings.warmup_steps
    upload_settings.repeats = 1
    bucket = "bench-upload"
    create_bucket(s3_env["AWS_ENDPOINT_URL"], bucket)
    env = {**s3_env, "BENCH_OUTPUT_URI": f"s3://{bucket}/jobs"}
    log.info("upload: one run of %d steps with a push every %d steps", upload_settings.warmup_steps +
             upload_settings.measure_steps, ALTERNATING_PUSH_INTERVAL)
    result = run_child("training", upload_settings, "upload", env=env)

    step_end_times, upload_times = result["step_end_times"], result["upload_times"]
    warmup_period, *periods = push_periods(step_end_times)
    for period in periods:
        period["uploads_outlast_period"] = _uploads_outlast(step_end_times, upload_times, period["push_step"])
    batch_size = settings.batch_size
    return {"periods": periods, "warmup_period": warmup_period,
            "overhead_pct": summarize([period["overhead_pct"] for period in periods]),
            "rates": {"push periods": summarize([batch_size * PUSH_EVERY_N_STEPS / period["during_s"]
                                                 for period in periods]),
                      "push-free periods": summarize([batch_size * PUSH_EVERY_N_STEPS / period["around_s"]
                                                      for period in periods])}}


def push_periods(step_end_times: list[float]) -> list[dict]:
    """Compare each push period of an alternating run with the push-free periods on either side.

    `step_end_times[i]` is the end of step i + 1. Pushes follow steps p = ALTERNATING_PUSH_INTERVAL,
    2 * ALTERNATING_PUSH_INTERVAL, ..., and a push's work on the training thread lands in step p + 1.
    With N = PUSH_EVERY_N_STEPS, the push period is steps p + 1 to p + N, as one period of a run
    that pushes every N steps. The baseline is the mean of the push-free periods p - N + 1 to p and
    p + N + 1 to p + 2N, which cancels a drift in machine speed that is linear over the three.

    Each push gets `overhead_pct`, the push period's time above the baseline as a share of it. It
    also gets `first_step_ms` and `later_steps_ms`: how much longer than the baseline's mean step
    step p + 1 and, on average, the other steps of the period took.
    """
    steps = PUSH_EVERY_N_STEPS
    duration_s = {step: end - start
                  for step, (start, end) in enumerate(zip(step_end_times, step_end_times[1:]), start=2)}

    def total_s(first_step: int) -> float:
        return sum(duration_s[step] for step in range(first_step, first_step + steps))

    periods = []
    last_push_step = len(step_end_times) - 2 * steps
    for push_step in range(ALTERNATING_PUSH_INTERVAL, last_push_step + 1, ALTERNATING_PUSH_INTERVAL):
        during_s = total_s(push_step + 1)
        around_s = (total_s(push_step - steps + 1) + total_s(push_step + steps + 1)) / 2
        step_baseline_s = around_s / steps
        first_step_s = duration_s[push_step + 1]
        periods.append({
            "push_step": push_step,
            "during_s": during_s,
            "around_s": around_s,
            "overhead_pct": 100.0 * (during_s - around_s) / around_s,
            "first_step_ms": 1000.0 * (first_step_s - step_baseline_s),
            "later_steps_ms": 1000.0 * ((during_s - first_step_s) / (steps - 1) - step_baseline_s),
        })
    return periods


def _uploads_outlast(step_end_times: list[float], upload_times: list[tuple[float, float]], push_step: int) -> bool:
    """Return whether an upload queued by the push after `push_step` ended after its push period.

    `upload_times` lists (queued, ended) times. The push's uploads are queued after step `push_step`
    ends and before the next push.
    """
    push_time = step_end_times[push_step - 1]
    next_push_time = step_end_times[min(push_step + ALTERNATING_PUSH_INTERVAL, len(step_end_times)) - 1]
    period_end = step_end_times[push_step + PUSH_EVERY_N_STEPS - 1]
    return any(ended > period_end for queued, ended in upload_times if push_time < queued <= next_push_time)


def bench_framework(settings: BenchSettings, measure_steps: int, rounds: int) -> dict:
    framework_settings = BenchSettings.from_json(settings.to_json())
    framework_settings.measure_steps, framework_settings.repeats = measure_steps, rounds
    log.info("framework: %d rounds of interleaved lightning and plain steps in one process", rounds)
    result = run_child("framework", framework_settings)
    return {**_paired_rates(result["runs"], "plain", "lightning", settings), "precision": result["precision"],
            "measure_steps": measure_steps}


def _paired_rates(runs: dict[str, list[list[float]]], baseline: str, candidate: str, settings: BenchSettings) -> dict:
    """Summarise images/s of two variants that ran in alternating rounds, and the candidate's overhead per round.

    Each round ran both variants back to back, so its ratio is the comparison least moved by drift in
    machine speed. The overhead figure is the median of those ratios. The rates count the steps after
    the warm-up.
    """
    rates = {variant: [images_per_s(times, settings.warmup_steps, settings.batch_size) for times in variant_runs]
             for variant, variant_runs in runs.items()}
    overheads = [100.0 * (baseline_rate / candidate_rate - 1.0)
                 for baseline_rate, candidate_rate in zip(rates[baseline], rates[candidate])]
    return {"rates": {variant: summarize(values) for variant, values in rates.items()},
            "overhead_pct": summarize(overheads)}


def bench_fid_recipe(arguments: argparse.Namespace, work_dir: Path, command: str) -> dict:
    """Run benchmarks/fid_recipe.py and keep its figures in FID_RESULTS_PATH, unless this is a quick run."""
    seeds = [int(seed) for seed in (arguments.fid_seeds or DEFAULT_FID_SEEDS).split(",") if seed.strip()]
    settings = FidSettings(steps=arguments.fid_steps, num_samples=arguments.fid_samples,
                           work_dir=str(work_dir / "fid"))
    result = bench_fid(settings, seeds)
    result["context"]["command"] = command
    if not arguments.quick:
        FID_RESULTS_PATH.write_text(json.dumps(result, indent=1))
    return result


def bench_startup(settings: BenchSettings, repeats: int) -> dict:
    from benchmarks.startup import import_times, measure_startup

    runs = []
    for repeat in range(repeats):
        log.info("startup: repeat %d", repeat + 1)
        runs.append(measure_startup(settings, repeat))
    return {
        "to_first_step_s": summarize([run["to_first_step_s"] for run in runs]),
        "total_s": summarize([run["total_s"] for run in runs]),
        "peak_rss_mb": summarize([run["peak_rss_mb"] for run in runs]),
        "import_s": import_times(),
    }


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    arguments = parse_arguments(argv)
    # dict.fromkeys drops repeated names and keeps the order.
    selected = list(dict.fromkeys(name.strip() for name in arguments.only.split(",") if name.strip()))
    if not selected:
        log.error("invalid --only %r: it names no benchmark; choose from %s", arguments.only, ",".join(ALL_BENCHMARKS))
        return 2
    unknown = sorted(set(selected) - set(ALL_BENCHMARKS))
    if unknown:
        log.error("unknown benchmark(s) %s; choose from %s", ", ".join(unknown), ", ".join(ALL_BENCHMARKS))
        return 2
    output = Path(arguments.output)
    if output.is_dir() or not output.parent.is_dir() or not os.access(output.parent, os.W_OK):
        log.error("invalid --output %s: it must be a file path in an existing, writable folder; create the folder "
                  "or choose another path", output)
        return 2
    first_timed_step = ALTERNATING_PUSH_INTERVAL - PUSH_EVERY_N_STEPS + 1
    if "upload" in selected and arguments.warmup_steps >= first_timed_step:
        log.error("invalid --warmup-steps %d for the upload benchmark: it must be below %d, the first step the "
                  "benchmark times; lower it and rerun", arguments.warmup_steps, first_timed_step)
        return 2
    uses_photos = bool(set(selected) - FASHION_MNIST_BENCHMARKS)
    if uses_photos and not Path(arguments.data_dir).is_dir():
        log.error("photo folder %s not found; pass --data-dir with a folder of class subfolders", arguments.data_dir)
        return 2

    work_dir = Path(arguments.work_dir) if arguments.work_dir else Path(tempfile.mkdtemp(prefix="fashion-gan-bench-"))
    settings = settings_from(arguments, work_dir)
    started = time.perf_counter()
    context = {"command": "python -m benchmarks.run " + " ".join(argv), "load_before": load_average(),
               "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine_facts(),
               "settings": settings}
    results: dict[str, dict] = {}
    try:
        if uses_photos:
            log.info("preparing the decoded-array cache in %s", work_dir)
            context["decoded"] = prepare_decoded_array(settings)
        s3_names = {"pull", "upload"} & set(selected)
        moto = None
        if s3_names:
            from benchmarks.s3 import MotoServer, s3_environment

            moto = MotoServer().__enter__()
            s3_env = s3_environment(moto.endpoint)
        try:
            for name in selected:
                log.info("running the %s benchmark", name)
                if name == "training":
                    results[name] = bench_training(settings)
                elif name == "pipeline":
                    results[name] = bench_pipeline(settings)
                elif name == "pull":
                    results[name] = bench_pull(settings, s3_env)
                elif name == "upload":
                    results[name] = bench_upload(settings, s3_env, arguments.upload_pushes)
                elif name == "framework":
                    results[name] = bench_framework(settings, arguments.framework_steps, arguments.framework_rounds)
                elif name == "startup":
                    results[name] = bench_startup(settings, arguments.startup_repeats)
                elif name == "fid":
                    results[name] = bench_fid_recipe(arguments, work_dir, context["command"])
        finally:
            if moto is not None:
                moto.__exit__(None, None, None)
    finally:
        if not arguments.work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    context["load_after"] = load_average()
    context["duration_s"] = time.perf_counter() - started
    if "fid" not in results and FID_RESULTS_PATH.is_file() and not arguments.quick:
        # The fid benchmark takes minutes per seed, so a run without it keeps its last recorded figures.
        results["fid"] = json.loads(FID_RESULTS_PATH.read_text())
    text = report.render(context, results, quick=arguments.quick)
    output.write_text(text)
    log.info("wrote %s after %.0f s", arguments.output, context["duration_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
