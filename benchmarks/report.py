"""Render the benchmark results as Markdown (benchmarks/RESULTS.md)."""

from __future__ import annotations

import math
import statistics

from benchmarks.training import ALTERNATING_PUSH_INTERVAL, PUSH_EVERY_N_STEPS

# Targets on a 2-core CPU: (description, comparison, threshold).
TARGETS = {
    "training_default": ("end-to-end, default settings vs reference", ">=", 2.0),
    "training_fp32": ("end-to-end, fp32 vs reference", ">=", 1.15),
    "pipeline": ("input pipeline vs reference DataLoader", ">=", 50.0),
    "pull_vs_sync": ("first dataset pull, times faster than `aws s3 sync`", ">=", 5.0),
    "cached_pull_s": ("cached re-pull, seconds", "<", 1.0),
    "upload_overhead_pct": (f"upload overhead with pushes every {PUSH_EVERY_N_STEPS} steps, %", "<=", 3.0),
    "framework_overhead_pct": ("framework overhead of the Lightning module, %", "<=", 5.0),
    "startup_s": ("start-up to the first optimizer step, seconds", "<=", 15.0),
    "fid_difference": ("val/fid after the same steps, project's default recipe minus the classic recipe "
                       "(mean over seeds)", "<", 0.0),
}


def render(context: dict, results: dict, quick: bool) -> str:
    lines = ["# Benchmark results", ""]
    if quick:
        lines += ["**Quick run with tiny settings (`--quick`): these figures only show that the harness works.**", ""]
    lines += _context_lines(context)
    figures: dict[str, float] = {}
    sections = {
        "training": _training_lines,
        "pipeline": _pipeline_lines,
        "pull": _pull_lines,
        "upload": _upload_lines,
        "framework": _framework_lines,
        "startup": _startup_lines,
        "fid": _fid_lines,
    }
    body: list[str] = []
    for name, render_section in sections.items():
        if name in results:
            body += render_section(results[name], context, figures)
    lines += _acceptance_lines(figures)
    lines += body
    lines += _method_lines()
    lines += _gpu_lines()
    return "\n".join(lines) + "\n"


def _context_lines(context: dict) -> list[str]:
    machine = context["machine"]
    settings = context["settings"]
    decoded = context.get("decoded", {})
    lines = [
        f"- Date: {context['started']}; harness wall time {context['duration_s'] / 60:.1f} min",
        f"- Command: `{context['command'].strip()}` (`make bench` runs `python -m benchmarks.run`)",
        f"- Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, {machine['memory_gb']} GB RAM, "
        f"bf16 CPU features: {', '.join(machine['cpu_bf16']) or 'none'}; GPU: {machine['cuda']}",
        f"- Software: {machine['os']}, Python {machine['python']}, torch {machine['torch']} "
        f"({machine['torch_threads']} intra-op threads, {machine['torch_interop_threads']} inter-op threads by default), "
        f"pytorch_lightning {machine.get('lightning', '?')}; commit {machine['git_commit']}",
        f"- Load average (1, 5, 15 min) before: {context['load_before']}; after: {context['load_after']}",
    ]
    if not decoded:
        # Only Fashion-MNIST benchmarks ran; their sections describe their own workload.
        return lines + [""]
    return lines + [
        f"- Workload: {settings.channels}x{settings.image_size}x{settings.image_size} photos from `{settings.data_dir}` "
        f"({decoded.get('images', '?')} images), batch {settings.batch_size}, generator/discriminator features "
        f"{settings.generator_features}/{settings.discriminator_features}, latent {settings.latent_dim}, dropout "
        f"{settings.dropout}, label smoothing {settings.label_smoothing}, Adam lr {settings.lr} betas "
        f"({settings.beta1}, {settings.beta2})",
        f"- Training figures: images/s over {settings.measure_steps} steps after {settings.warmup_steps} warm-up steps, "
        f"each run in a fresh process, {settings.repeats} repeats with the variants alternating; "
        "\"spread\" is (max - min) / median",
        f"- One-time decoded-array cache build for these photos: {decoded.get('build_s', float('nan')):.1f} s "
        "(excluded from the training figures; later runs reuse the cache)",
        "",
    ]


def _rate_row(name: str, summary: dict, unit: str, reference: float | None = None) -> str:
    if reference is None:
        ratio = "1.00x"  # the reference row itself
    else:
        ratio = f"{summary['median'] / reference:.2f}x"
    return (f"| {name} | {summary['median']:.1f} {unit} | {summary['min']:.1f} - {summary['max']:.1f} "
            f"({summary['spread_pct']:.0f} %) | {ratio} |")


def _table_header(first: str) -> list[str]:
    return [f"| {first} | median | min - max (spread) | ratio to reference |", "| --- | --- | --- | --- |"]


def _training_lines(result: dict, context: dict, figures: dict) -> list[str]:
    rates = result["rates"]
    reference = rates["reference"]["median"]
    figures["training_default"] = rates["project"]["median"] / reference
    figures["training_fp32"] = rates["project-fp32"]["median"] / reference
    precision = result["extras"]["project"][0]["precision"]
    lines = ["## End-to-end training throughput", "",
             "Data loading included. Reference: the classic recipe in benchmarks/reference.py (float32, "
             f"{context['settings'].reference_workers} DataLoader workers decoding JPEGs every epoch). Project: "
             f"`fashion_gan.train.run` with the default trainer settings (precision auto = {precision}, "
             "channels_last, no loader workers) and `logger=csv`.", ""]
    lines += _table_header("variant")
    lines.append(_rate_row("reference (classic recipe)", rates["reference"], "images/s", None))
    lines.append(_rate_row(f"project, defaults ({precision})", rates["project"], "images/s", reference))
    lines.append(_rate_row("project, trainer.precision=32-true", rates["project-fp32"], "images/s", reference))
    lines += ["", "| variant | process start to first step (median) | peak RSS (median) |", "| --- | --- | --- |"]
    for variant, label in (("reference", "reference"), ("project", "project, defaults"),
                           ("project-fp32", "project, fp32")):
        extras = result["extras"][variant]
        to_first = sorted(item["to_first_step_s"] for item in extras)[len(extras) // 2]
        rss = sorted(item["peak_rss_mb"] for item in extras)[len(extras) // 2]
        lines.append(f"| {label} | {to_first:.1f} s | {rss:.0f} MB |")
    lines += ["", "The reference's peak RSS is its main process only; each of its DataLoader workers is a "
              "further process.", ""]
    return lines


def _pipeline_lines(result: dict, context: dict, figures: dict) -> list[str]:
    reference = result["reference"]["median"]
    figures["pipeline"] = result["project"]["median"] / reference
    lines = ["## Input pipeline throughput", "",
             f"Images/s delivered to the training step, no training. Project: {result['project_batches']} batches "
             "from the decoded uint8 array (DecodedArrayDataModule) including the step's conversion to float, "
             f"flip and channels_last. Reference: {result['reference_batches']} batches of its DataLoader after "
             "the first batch.", ""]
    lines += _table_header("loader")
    lines.append(_rate_row("reference DataLoader", result["reference"], "images/s", None))
    lines.append(_rate_row("decoded-array loader", result["project"], "images/s", reference))
    return lines + [""]


def _pull_lines(result: dict, context: dict, figures: dict) -> list[str]:
    timings = result["timings"]
    first = timings["dataset_first_pull"]["median"]
    if "aws_s3_sync" in timings:
        figures["pull_vs_sync"] = timings["aws_s3_sync"]["median"] / first
    figures["cached_pull_s"] = timings["dataset_cached_pull"]["median"]
    labels = {
        "dataset_first_pull": "project: versioned dataset, first pull (`dataset:NAME/N`)",
        "dataset_cached_pull": "project: versioned dataset, cached re-pull",
        "prefix_pull": "project: plain prefix pull (`data.source=s3://...`), empty cache",
        "boto3_one_by_one": "boto3 `download_file`, one object at a time",
        "aws_s3_sync": f"`aws s3 sync` ({result.get('aws_cli') or 'not installed'})",
    }
    lines = ["## Dataset pull from the loopback S3 server", "",
             f"{result['file_count']} photos on a moto server on 127.0.0.1, stored as a versioned dataset (tar "
             "shards) and as one object per photo. Each pull starts from an empty folder except the cached "
             "re-pull. The plain prefix pull and boto3 one at a time run in the first "
             f"{timings['boto3_one_by_one']['n']} repeat(s) only. Files counted after each method's last repeat: "
             f"{result['checked_counts']}.", "",
             "| method | median | min - max (spread) | times slower than the first dataset pull |",
             "| --- | --- | --- | --- |"]
    for name, label in labels.items():
        if name in timings:
            summary = timings[name]
            lines.append(f"| {label} | {summary['median']:.2f} s | {summary['min']:.2f} - {summary['max']:.2f} "
                         f"({summary['spread_pct']:.0f} %) | {summary['median'] / first:.1f}x |")
    if "aws_s3_sync" not in timings:
        lines += ["", "The AWS CLI is not on PATH, so `aws s3 sync` was not measured."]
    return lines + [""]


def _upload_lines(result: dict, context: dict, figures: dict) -> list[str]:
    periods, overheads, rates = result["periods"], result["overhead_pct"], result["rates"]
    mean, standard_error = _mean_and_standard_error(overheads["values"])
    figures["upload_overhead_pct"] = mean
    steps = PUSH_EVERY_N_STEPS
    outlasting = sum(period["uploads_outlast_period"] for period in periods)
    lines = ["## Upload overhead", "",
             f"The project writing its run to the moto S3 server, pushing a checkpoint and a sample grid (uploads on "
             f"a background thread) after every {ALTERNATING_PUSH_INTERVAL}th step of one run. Periods of {steps} "
             f"steps with a push, as in a run that pushes every {steps} steps, thus alternate with periods of {steps} "
             "steps without one, and both share the run's drift in machine speed. A push period starts with the "
             "step that takes the push's work on the training thread and goes on during its uploads. Its overhead "
             f"is its time above the mean of the push-free periods before and after it. {_pushes(len(periods))} "
             f"counted, after {ALTERNATING_PUSH_INTERVAL - steps} warm-up steps and a warm-up push (its period: "
             f"{result['warmup_period']['overhead_pct']:.1f} %), which also pays the costs a run pays once, at its "
             "first checkpoint and sample grid.", "",
             "| periods | images/s, median | min - max (spread) |", "| --- | --- | --- |"]
    labels = {"push-free periods": "push-free (mean of the two around each push)", "push periods": "with a push"}
    for name, label in labels.items():
        summary = rates[name]
        lines.append(f"| {label} | {summary['median']:.1f} | {summary['min']:.1f} - {summary['max']:.1f} "
                     f"({summary['spread_pct']:.0f} %) |")
    precision = f"standard error {standard_error:.1f} points" if len(periods) > 1 else "one push, so no standard error"
    first_step = statistics.mean(period["first_step_ms"] for period in periods)
    later_steps = statistics.mean(period["later_steps_ms"] for period in periods)
    lines += ["",
              f"Overhead: {mean:.1f} % of the step time (mean over pushes, {precision}; median "
              f"{overheads['median']:.1f} %; per push: {_percentages(overheads)}).",
              "",
              f"Where the time goes (mean over pushes, against the push-free periods' mean step): the step after the "
              f"push took {first_step:.0f} ms longer (the checkpoint snapshot and the sample grid run on the training "
              f"thread, and the checkpoint writer and the upload thread start beside it), and each later step of the "
              f"push period {later_steps:.1f} ms longer. In {outlasting} of {_pushes(len(periods))} an upload was "
              "still running when the push period ended: the server gets only idle CPU time, which training on every "
              "core leaves little of, so it stores the uploads slowly while the client waits on the socket. Single "
              "periods scatter by several points: on the 2-core VM where this harness was built, step times without "
              "pushes moved between about 500 and 575 ms for stretches of 5 to 30 steps.", ""]
    return lines


def _pushes(count: int) -> str:
    return f"{count} push" if count == 1 else f"{count} pushes"


def _mean_and_standard_error(values: list[float]) -> tuple[float, float]:
    """Return the mean of `values` and its standard error (0 for a single value)."""
    if len(values) < 2:
        return values[0], 0.0
    return statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values))


def _percentages(summary: dict) -> str:
    return ", ".join(f"{value:.1f}" for value in summary["values"]) + " %"


def _framework_lines(result: dict, context: dict, figures: dict) -> list[str]:
    rates, overheads = result["rates"], result["overhead_pct"]
    overhead = overheads["median"]
    figures["framework_overhead_pct"] = overhead
    lines = ["## Framework overhead", "",
             f"The same D and G updates ({result['precision']}, channels_last) on one fixed uint8 batch, "
             f"{result['measure_steps']} timed steps: `pl.Trainer.fit` on the project's DCGAN module vs a plain "
             f"PyTorch loop over networks of its own. {overheads['n']} rounds in one process, each one Lightning fit "
             "that runs one plain step after each of its steps, so the two variants' steps alternate and both see "
             "the same drift in machine speed. A Lightning step counts from the end of the plain step before it "
             "to the module's next on_train_batch_end: the batch fetch, the hooks, training_step and the loop's "
             "bookkeeping.", "",
             "| variant | median | min - max (spread) |", "| --- | --- | --- |"]
    for variant in ("plain", "lightning"):
        summary = rates[variant]
        lines.append(f"| {variant} | {summary['median']:.1f} images/s | {summary['min']:.1f} - {summary['max']:.1f} "
                     f"({summary['spread_pct']:.0f} %) |")
    lines += ["", f"Overhead: {overhead:.1f} % of the step time (median over rounds of the paired ratios; per round: "
                  f"{_percentages(overheads)}).", ""]
    return lines


def _startup_lines(result: dict, context: dict, figures: dict) -> list[str]:
    figures["startup_s"] = result["to_first_step_s"]["median"]
    imports = ", ".join(f"`import {name}` {seconds:.1f} s" for name, seconds in result["import_s"].items())
    first, total, rss = result["to_first_step_s"], result["total_s"], result["peak_rss_mb"]
    return ["## Start-up and memory", "",
            "`python train.py experiment=fashion_photos ... trainer.max_steps=1` with a warm decoded-array cache.", "",
            "| figure | median | min - max |", "| --- | --- | --- |",
            f"| process start to end of first optimizer step | {first['median']:.1f} s | {first['min']:.1f} - {first['max']:.1f} |",
            f"| whole process (incl. final checkpoint and sample grid) | {total['median']:.1f} s | {total['min']:.1f} - {total['max']:.1f} |",
            f"| peak RSS | {rss['median']:.0f} MB | {rss['min']:.0f} - {rss['max']:.0f} |",
            "", f"Fresh-interpreter import times: {imports}.", ""]


def _fid_lines(result: dict, context: dict, figures: dict) -> list[str]:
    settings, summary, fid_context = result["settings"], result["summary"], result["context"]
    classic, project = summary["classic"], summary["project"]
    figures["fid_difference"] = project["fid_mean"] - classic["fid_mean"]
    lines = ["## Sample quality after the same number of steps (FID)", "",
             f"Fashion-MNIST at 1x{settings['image_size']}x{settings['image_size']}, the project's Generator and "
             f"Discriminator (features {settings['generator_features']}/{settings['discriminator_features']}, latent "
             f"{settings['latent_dim']}), batch {settings['batch_size']}, Adam lr {settings['lr']} betas "
             f"({settings['beta1']}, {settings['beta2']}), {settings['steps']} steps per recipe and seed. Classic: "
             "benchmarks/fid_recipe.py's torchvision transforms over the idx files (Resize, ToTensor, Normalize; "
             "applied once and cached, so the batches match the worker pipeline's) and the float32 loop of "
             "benchmarks/reference.py. "
             "Project: `train.py experiment=fashion_mnist` with its defaults (EMA generator, precision auto). "
             f"Both scored like `val/fid`: FidEvaluator(\"fashion_mnist_classifier\"), {settings['num_samples']} "
             "generated images from noise seed 1234 against the statistics of a seeded subset of as many decoded "
             "training images. Class coverage: normalized entropy of the predicted classes (1 = all ten classes "
             "equally often).", "",
             "| seed | classic FID | classic coverage | project FID | project coverage | project val/fid logged by the run |",
             "| --- | --- | --- | --- | --- | --- |"]
    for run in result["runs"]:
        logged = run["project"].get("logged_val_fid")
        lines.append(f"| {run['seed']} | {run['classic']['fid']:.2f} | {run['classic']['class_coverage']:.3f} | "
                     f"{run['project']['fid']:.2f} | {run['project']['class_coverage']:.3f} | "
                     f"{'-' if logged is None else f'{logged:.2f}'} |")
    lines.append(f"| mean | {classic['fid_mean']:.2f} | {classic['class_coverage_mean']:.3f} | "
                 f"{project['fid_mean']:.2f} | {project['class_coverage_mean']:.3f} | |")
    floors = ", ".join(f"{run['classic']['real_pipeline_fid']:.2f}" for run in result["runs"])
    train_s = [(run["classic"]["train_s"], run["project"]["train_s"]) for run in result["runs"]]
    cpu_s = [(run["classic"].get("train_cpu_s"), run["project"].get("process_cpu_s")) for run in result["runs"]]
    lines += ["", f"The project's FID is lower on {summary['project_lower_on']} of {summary['seeds']} seed(s). "
              f"Real training images through the classic transforms score {floors} against the same statistics "
              "because PIL's bilinear upsampling from 28 to 32 pixels differs from the project's antialiased bicubic "
              "one. That is the lowest FID the classic recipe can reach here.",
              "", f"Training wall time per run (classic, project), seconds: "
              + ", ".join(f"({classic_s:.0f}, {project_s:.0f})" for classic_s, project_s in train_s)
              + "; CPU seconds (classic training loop, whole project train.py process): "
              + ", ".join("-" if None in pair else f"({pair[0]:.0f}, {pair[1]:.0f})" for pair in cpu_s)
              + f"; project precision {result['runs'][0]['project']['precision']}. Run {fid_context['started']} by "
              f"`{fid_context['command']}`, {fid_context['duration_s'] / 60:.1f} min, load average before "
              f"{fid_context['load_before']}, after {fid_context['load_after']}.",
              "", f"Project command of the first seed: `{result['runs'][0]['project']['command']}`.", ""]
    return lines


def _acceptance_lines(figures: dict) -> list[str]:
    lines = ["## Summary against the targets", "", "| figure | target | measured | result |", "| --- | --- | --- | --- |"]
    for key, (description, comparison, threshold) in TARGETS.items():
        unit = "x" if key in ("training_default", "training_fp32", "pipeline", "pull_vs_sync") else ""
        if key not in figures:
            lines.append(f"| {description} | {comparison} {threshold:g}{unit} | not measured | - |")
            continue
        value = figures[key]
        passed = {">=": value >= threshold, "<=": value <= threshold, "<": value < threshold}[comparison]
        lines.append(f"| {description} | {comparison} {threshold:g}{unit} | {value:.2f}{unit} | "
                     f"{'pass' if passed else 'FAIL'} |")
    return lines + [""]


def _method_lines() -> list[str]:
    return ["## Method notes", "",
            "- The reference imports the project's Generator and Discriminator, so changes inside the networks "
            "(such as FastDropout) speed up both sides; the ratios come from the input pipeline, the training "
            "loop, the precision and the memory format.",
            "- Both sides use torch's default intra-op thread count (one per core). The reference's DataLoader "
            "workers run one thread each, as PyTorch sets them, beside the training threads on the same cores.",
            "- The moto server replaces a remote S3 service, so it runs under SCHED_IDLE (the kernel gives it only "
            "otherwise idle CPU time) and keeps objects in memory rather than in temporary files. A checkpoint push "
            "costs it 0.52 to 0.57 s of CPU (storing the 90 MB upload and the server-side copy to `last.ckpt`; "
            "0.62 to 1.01 s through temporary files), work that a remote service does on its own machines. While "
            "training keeps both cores busy the server gets little of their time, so most of that work waits until "
            "the training steps end. The upload client runs inside the training process: it hashes the checkpoint "
            "(sha256, about 53 ms of CPU for 90 MB) during the push period, but its sending, about 30 to 40 ms of "
            "CPU per checkpoint, waits with the server.",
            "- The project runs with `logger=csv`: the default W&B logger starts a service process, which the "
            "reference does not have.",
            ""]


def _gpu_lines() -> list[str]:
    return ["## GPU", "",
            "`bash benchmarks/gpu_check.sh` trains 200 steps at 64x64, batch 128, bf16-mixed on a CUDA machine and "
            "prints images/s for the project and the reference and the peak GPU memory. No figures here: the "
            "machine these results come from has no GPU.", ""]
