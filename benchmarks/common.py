"""Shared pieces of the benchmarks: settings, child processes, statistics and machine facts."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = PROJECT_DIR.parent / "shared" / "data" / "clothing-small" / "train"


@dataclass
class BenchSettings:
    """Settings every benchmark trains with. The defaults are the clothing-photo experiment (3x64x64, batch 64)."""

    data_dir: str = str(DEFAULT_DATA_DIR)
    work_dir: str = ""  # scratch folder for caches, outputs and downloads; "" = a new temporary folder
    image_size: int = 64
    channels: int = 3
    batch_size: int = 64
    generator_features: int = 64
    discriminator_features: int = 64
    latent_dim: int = 100
    dropout: float = 0.3  # conf/experiment/fashion_photos.yaml
    label_smoothing: float = 0.1  # conf/experiment/fashion_photos.yaml
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    seed: int = 42
    reference_workers: int = 2  # DataLoader worker processes of the classic recipe
    device: str = "cpu"  # where the reference trains; the project picks its accelerator itself (auto)
    warmup_steps: int = 3
    measure_steps: int = 10
    repeats: int = 3

    def model_overrides(self) -> list[str]:
        """Return the Hydra overrides that give train.py exactly these data and model settings."""
        return [
            "experiment=fashion_photos",
            f"data.source={self.data_dir}",
            f"data.image_size={self.image_size}",
            f"data.channels={self.channels}",
            f"data.batch_size={self.batch_size}",
            f"model.generator_features={self.generator_features}",
            f"model.discriminator_features={self.discriminator_features}",
            f"model.latent_dim={self.latent_dim}",
            f"model.dropout={self.dropout}",
            f"model.label_smoothing={self.label_smoothing}",
            f"model.lr={self.lr}",
            f"model.beta1={self.beta1}",
            f"model.beta2={self.beta2}",
            f"run.seed={self.seed}",
        ]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "BenchSettings":
        return cls(**json.loads(text))


def child_parser(description: str) -> argparse.ArgumentParser:
    """Return the argument parser every benchmark child process shares."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--settings", required=True, help="BenchSettings as JSON")
    parser.add_argument("--result", required=True, help="file to write the JSON result to")
    parser.add_argument("--variant", default="", help="which side of the comparison to run")
    return parser


def write_result(path: str, result: dict) -> None:
    Path(path).write_text(json.dumps(result, indent=1))


def run_child(module: str, settings: BenchSettings, variant: str = "", env: dict[str, str] | None = None,
              timeout_s: float = 900) -> dict:
    """Run `python -m benchmarks.<module>` in a fresh process and return its JSON result.

    The result gains `spawned_at` (wall-clock time just before the process started), `wall_s` and
    `peak_rss_mb`, the child's peak resident memory as the kernel reports it to wait4.
    """
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result_path = handle.name
    command = [sys.executable, "-m", f"benchmarks.{module}", "--settings", settings.to_json(),
               "--result", result_path, "--variant", variant]
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    log_path = Path(result_path).with_suffix(".log")
    spawned_at = time.time()
    started = time.perf_counter()
    with open(log_path, "w") as log_handle:
        process = subprocess.Popen(command, cwd=PROJECT_DIR, env=child_env, stdout=log_handle,
                                   stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.05)  # poll interval; os.wait4 with a timeout does not exist
    wall_s = time.perf_counter() - started
    exit_code = os.waitstatus_to_exitcode(status)
    process.returncode = exit_code
    output = log_path.read_text(errors="replace")
    if exit_code != 0:
        raise RuntimeError(f"benchmarks.{module} --variant {variant!r} failed with exit code {exit_code}:\n"
                           f"{output[-4000:]}")
    result = json.loads(Path(result_path).read_text())
    Path(result_path).unlink(missing_ok=True)
    log_path.unlink(missing_ok=True)
    # ru_maxrss is in KiB on Linux.
    result.update(spawned_at=spawned_at, wall_s=wall_s, peak_rss_mb=usage.ru_maxrss / 1024)
    return result


def images_per_s(step_end_times: list[float], warmup_steps: int, batch_size: int) -> float:
    """Return images/s between the end of step `warmup_steps` and the end of the last step.

    `step_end_times[i]` is the perf_counter time at the end of step i + 1.
    """
    start = step_end_times[warmup_steps - 1]
    steps = len(step_end_times) - warmup_steps
    return steps * batch_size / (step_end_times[-1] - start)


def summarize(values: list[float]) -> dict:
    """Return the median, minimum, maximum and spread ((max - min) / median, in %) of repeated figures."""
    median = statistics.median(values)
    return {
        "median": median,
        "min": min(values),
        "max": max(values),
        "spread_pct": 100.0 * (max(values) - min(values)) / median if median else 0.0,
        "values": list(values),
        "n": len(values),
    }


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def machine_facts() -> dict:
    """Return what RESULTS.md states about the machine: CPU, cores, memory, bf16 support, versions."""
    import torch

    facts = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1),
        "cpu_bf16": _cpu_flags_with(("avx512_bf16", "amx_bf16", "amx_tile")),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    try:
        import pytorch_lightning

        facts["lightning"] = pytorch_lightning.__version__
    except ImportError:
        pass
    facts["git_commit"] = _git_commit()
    return facts


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags_with(names: tuple[str, ...]) -> list[str]:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [name for name in names if name in flags]


def _git_commit() -> str:
    try:
        output = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_DIR, capture_output=True,
                                text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_DIR,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return output.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")
