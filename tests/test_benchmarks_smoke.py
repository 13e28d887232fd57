"""The benchmark harness with tiny settings, its statistics, and FastDropout (the discriminator's dropout)."""

import itertools
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from training_helpers import CLOTHING_DIR, PROJECT_DIR

# benchmarks/ is a folder of the repository, not part of the installed package.
if str(PROJECT_DIR) not in sys.path:
    sys.path.insert(0, str(PROJECT_DIR))

from benchmarks.common import images_per_s, summarize  # noqa: E402
from fashion_gan.models.blocks import FastDropout  # noqa: E402


def test_summarize_median_and_spread():
    summary = summarize([10.0, 12.0, 11.0])
    assert summary["median"] == 11.0
    assert summary["min"] == 10.0
    assert summary["max"] == 12.0
    assert summary["spread_pct"] == pytest.approx(100 * 2 / 11)


def test_images_per_s_skips_warmup():
    # Steps end at 1, 2, 3, 5 s: after 2 warm-up steps, 2 steps of 8 images take 3 s.
    assert images_per_s([1.0, 2.0, 3.0, 5.0], warmup_steps=2, batch_size=8) == pytest.approx(16 / 3)


def _step_end_times(durations_s: list[float]) -> list[float]:
    return list(itertools.accumulate(durations_s))


def test_push_periods_against_surrounding_periods():
    from benchmarks.run import push_periods

    # 3 warm-up steps, then 1 s steps; pushes follow steps 50 and 100, and 150 steps in all. The push
    # after step 50 adds 0.5 s to step 51 and 0.1 s to steps 52 to 75. Around the push after step 100
    # the machine slows down linearly (1.0 s per step before, 1.2 s after, 1.1 s during the period).
    durations = [5.0] * 3 + [1.0] * 47 + [1.5] + [1.1] * 24 + [1.0] * 25 + [1.1] * 25 + [1.2] * 25
    periods = push_periods(_step_end_times(durations))
    assert [period["push_step"] for period in periods] == [50, 100]
    first, second = periods
    assert first["overhead_pct"] == pytest.approx(100 * (0.5 + 24 * 0.1) / 25)
    assert first["first_step_ms"] == pytest.approx(500.0)
    assert first["later_steps_ms"] == pytest.approx(100.0)
    assert first["around_s"] == pytest.approx(25.0)
    # A linear drift cancels: no push cost measured.
    assert second["overhead_pct"] == pytest.approx(0.0, abs=1e-9)


def test_uploads_outlast_push_period():
    from benchmarks.run import _uploads_outlast

    step_end_times = [float(step) for step in range(1, 151)]  # step N ends at N s
    # The push after step 50 queues at 50.1 s; its period (steps 51 to 75) ends at 75 s. real.png's upload
    # (queued at 0.1 s) and the next push's (queued after step 100) do not count.
    assert not _uploads_outlast(step_end_times, [(0.1, 140.0), (50.1, 52.4), (50.3, 74.9), (100.2, 149.0)], 50)
    assert _uploads_outlast(step_end_times, [(50.1, 52.4), (50.3, 75.5)], 50)


@pytest.mark.parametrize("flag", ["--framework-rounds", "--upload-pushes", "--measure-steps", "--repeats"])
@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_bench_counts_reject_invalid(flag, value, capsys):
    from benchmarks.run import parse_arguments

    with pytest.raises(SystemExit) as exit_info:
        parse_arguments([flag, value])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert flag in message
    assert "at least 1" in message


@pytest.mark.parametrize("value", ["abc", "1,x", "-3", ","])
def test_bench_fid_seeds_reject_invalid(value, capsys):
    from benchmarks.run import parse_arguments

    with pytest.raises(SystemExit) as exit_info:
        parse_arguments(["--fid-seeds", value])
    assert exit_info.value.code == 2
    assert "invalid seed list" in capsys.readouterr().err


def test_bench_fid_seeds_drop_blanks():
    from benchmarks.run import parse_arguments

    assert parse_arguments(["--fid-seeds", " 1, 2,,3 "]).fid_seeds == "1,2,3"


@pytest.mark.parametrize("only", ["", ",", " , "])
def test_bench_rejects_empty_selection(only, tmp_path, caplog):
    from benchmarks.run import main

    output = tmp_path / "RESULTS.md"
    assert main(["--only", only, "--output", str(output)]) == 2
    assert "names no benchmark" in caplog.text
    assert not output.exists()


@pytest.mark.parametrize("relative_output", ["missing/RESULTS.md", "a-file/RESULTS.md", "."])
def test_bench_rejects_unwritable_output(relative_output, tmp_path, caplog):
    from benchmarks.run import main

    (tmp_path / "a-file").write_text("a file where a folder should be")
    assert main(["--only", "startup", "--output", str(tmp_path / relative_output)]) == 2
    assert "invalid --output" in caplog.text


def test_bench_quick_keeps_recorded_results():
    from benchmarks.run import QUICK_RESULTS_PATH, RESULTS_PATH, parse_arguments

    assert parse_arguments([]).output == str(RESULTS_PATH)
    assert parse_arguments(["--quick"]).output == str(QUICK_RESULTS_PATH)
    assert parse_arguments(["--quick", "--output", "chosen.md"]).output == "chosen.md"


def test_bench_warmup_limit_only_without_quick(tmp_path, caplog):
    from benchmarks.run import main

    missing_photos = str(tmp_path / "no-photos")
    # Without --quick the warm-up check rejects 30. --quick replaces it with 1, so the run reaches the next check.
    assert main(["--only", "upload", "--warmup-steps", "30", "--data-dir", missing_photos]) == 2
    assert "invalid --warmup-steps 30" in caplog.text
    caplog.clear()
    assert main(["--quick", "--only", "upload", "--warmup-steps", "30", "--data-dir", missing_photos]) == 2
    assert "invalid --warmup-steps" not in caplog.text
    assert "photo folder" in caplog.text


def test_overhead_mean_standard_error():
    from benchmarks.report import _mean_and_standard_error

    mean, standard_error = _mean_and_standard_error([1.0, 2.0, 6.0])
    assert mean == pytest.approx(3.0)
    assert standard_error == pytest.approx(math.sqrt(7.0 / 3.0))  # standard deviation sqrt(7), divided by sqrt(3)
    assert _mean_and_standard_error([4.0]) == (4.0, 0.0)


def _server_temporary_files(pid: int) -> list[str]:
    """Return the files under the temporary folder that process `pid` has open."""
    temporary_root = os.path.realpath(tempfile.gettempdir())
    targets = []
    for descriptor in Path(f"/proc/{pid}/fd").iterdir():
        try:
            targets.append(os.readlink(descriptor))
        except OSError:
            continue  # closed while listing
    return [target for target in targets if target.startswith(temporary_root + os.sep)]


def _bench_bucket_client(endpoint: str, bucket: str):
    """Create `bucket` on the benchmark server at `endpoint` and return a boto3 S3 client for it."""
    import boto3

    from benchmarks.s3 import create_bucket, s3_environment

    environment = s3_environment(endpoint)
    create_bucket(endpoint, bucket)
    return boto3.client("s3", endpoint_url=endpoint, region_name=environment["AWS_DEFAULT_REGION"],
                        aws_access_key_id=environment["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=environment["AWS_SECRET_ACCESS_KEY"])


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to list the server's open files")
def test_bench_server_objects_in_memory():
    from benchmarks.s3 import MotoServer

    # By default moto moves an object above about 5 MiB to a temporary file, so a 6 MiB one would be there.
    with MotoServer() as server:
        client = _bench_bucket_client(server.endpoint, "bench-memory")
        body = os.urandom(6 * 1024 * 1024)
        client.put_object(Bucket="bench-memory", Key="six-mib", Body=body)
        assert client.get_object(Bucket="bench-memory", Key="six-mib")["Body"].read() == body
        assert _server_temporary_files(server.process.pid) == []



def _thread_policies(pid: int) -> dict[int, tuple[int, int]]:
    """Return {thread id: (scheduling policy, niceness)} of the live threads of process `pid`."""
    policies = {}
    for name in os.listdir(f"/proc/{pid}/task"):
        try:
            policies[int(name)] = (os.sched_getscheduler(int(name)), os.getpriority(os.PRIO_PROCESS, int(name)))
        except ProcessLookupError:
            continue  # the thread ended while listing
    return policies


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="needs Linux's SCHED_IDLE policy")
def test_bench_server_threads_idle_priority():
    from benchmarks.s3 import SERVER_NICENESS, MotoServer

    with MotoServer() as server:
        client = _bench_bucket_client(server.endpoint, "bench-priority")
        client.put_object(Bucket="bench-priority", Key="small", Body=b"bytes")
        policies = _thread_policies(server.process.pid)

    assert policies
    for thread_id, (policy, niceness) in policies.items():
        assert policy == os.SCHED_IDLE, thread_id
        assert niceness == SERVER_NICENESS, thread_id

@pytest.mark.parametrize("probability", [0.05, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_dropout_drop_rate_and_scale(probability, dtype):
    dropout = FastDropout(probability)
    torch.manual_seed(0)
    output = dropout(torch.ones(64, 16, 32, 32, dtype=dtype))
    assert output.dtype == dtype
    dropped = (output == 0).float().mean().item()
    assert dropped == pytest.approx(probability, abs=0.005)
    kept_values = output[output != 0].float()
    expected_scale = torch.tensor(1 / (1 - round(probability * 65536) / 65536), dtype=dtype).float()
    assert torch.equal(kept_values, torch.full_like(kept_values, expected_scale.item()))


def test_fast_dropout_masks_differ_between_calls():
    dropout = FastDropout(0.5)
    inputs = torch.ones(8, 16, 32, 32)
    torch.manual_seed(3)
    first, second = dropout(inputs) == 0, dropout(inputs) == 0
    # Independent masks agree on about half of the elements; a repeated mask would agree on all.
    assert (first == second).float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_fast_dropout_repeats_with_seed():
    dropout = FastDropout(0.5)
    inputs = torch.randn(4, 8, 16, 16).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(7)
    first = dropout(inputs)
    torch.manual_seed(7)
    second = dropout(inputs)
    assert torch.equal(first, second)
    assert first.is_contiguous(memory_format=torch.channels_last)


def test_fast_dropout_under_torch_compile():
    compiled = torch.compile(FastDropout(0.3), backend="eager")
    inputs = torch.ones(64, 8, 16, 16)
    torch.manual_seed(1)
    first = compiled(inputs)
    torch.manual_seed(1)
    second = compiled(inputs)
    assert torch.equal(first, second)
    assert (first == 0).float().mean().item() == pytest.approx(0.3, abs=0.01)


def test_fast_dropout_empty_input():
    inputs = torch.empty(0, 16, 8, 8)
    assert FastDropout(0.3)(inputs).shape == (0, 16, 8, 8)


def test_fast_dropout_all_dropped_keeps_gradient():
    inputs = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    output = FastDropout(1.0)(inputs)
    assert torch.equal(output, torch.zeros_like(output))
    assert output.is_contiguous(memory_format=torch.channels_last)
    output.sum().backward()
    assert torch.equal(inputs.grad, torch.zeros_like(inputs))


def test_fast_dropout_eval_and_gradient():
    dropout = FastDropout(0.3)
    inputs = torch.randn(2, 3, 4, 4, requires_grad=True)
    dropout.eval()
    assert dropout(inputs) is inputs
    dropout.train()
    output = dropout(inputs)
    output.sum().backward()
    # The gradient is the mask: 0 where dropped, the scale where kept.
    assert torch.equal(inputs.grad == 0, output.detach() == 0)
    assert isinstance(dropout, nn.Dropout)


def test_framework_steps_interleave():
    from benchmarks.common import BenchSettings
    from benchmarks.framework import PlainLoop, train_interleaved

    # Small networks keep this fast; the timing logic does not depend on their size.
    settings = BenchSettings(image_size=32, batch_size=8, generator_features=8, discriminator_features=8)
    steps = 3
    durations = train_interleaved(settings, "32-true", steps)
    assert len(durations["lightning"]) == steps
    assert len(durations["plain"]) == steps
    assert all(duration > 0 for duration in durations["lightning"] + durations["plain"])

    # The plain loop trains networks of its own: one step moves its weights away from a fresh copy's.
    plain, untrained = PlainLoop(settings, "32-true"), PlainLoop(settings, "32-true")
    plain.step()
    changed = [not torch.equal(trained, initial) for trained, initial
               in zip(plain.generator.parameters(), untrained.generator.parameters())]
    assert any(changed)


@pytest.mark.slow
def test_quick_benchmark_writes_results(tmp_path):
    if not CLOTHING_DIR.is_dir():
        pytest.skip(f"clothing photos not found at {CLOTHING_DIR}")
    output = tmp_path / "RESULTS.md"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--only", "pipeline,upload,framework",
         "--output", str(output), "--work-dir", str(tmp_path / "work")],
        # Every benchmark process imports torch and Lightning, which takes minutes on a loaded 2-core machine.
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    text = output.read_text()
    assert "## Input pipeline throughput" in text
    assert "## Framework overhead" in text
    assert "| input pipeline vs reference DataLoader | >= 50x |" in text
    # A warm-up push after step 50 and one counted push after step 100 of a 150-step run.
    assert "1 push counted, after 25 warm-up steps and a warm-up push" in text
    assert re.search(r"\| upload overhead with pushes every 25 steps, % \| <= 3 \| -?\d+\.\d\d \| (pass|FAIL) \|", text)
    assert "| end-to-end, default settings vs reference | >= 2x | not measured | - |" in text
