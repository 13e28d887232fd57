"""Child process of the dataset-pull benchmark, against the harness's moto server (AWS_ENDPOINT_URL).

The photos are stored twice in one bucket: as a versioned dataset (tar shards and a manifest,
`fashion-gan data upload`) and as one object per photo under `photos/`. Each repeat times, with
an empty local folder unless stated:
  dataset_first_pull    pull_dataset of the version (download, sha256 check, extraction)
  dataset_cached_pull   pull_dataset again into the same cache (manifest comparison only)
  prefix_pull           pull_source for `data.source=s3://bucket/photos` (parallel object downloads)
  boto3_one_by_one      list the prefix, then download_file for each object in turn
  aws_s3_sync           `aws s3 sync s3://bucket/photos DIR --endpoint-url ...`, when `aws` is on PATH
The two methods that no target compares (prefix_pull and boto3_one_by_one, about 40 s together on
the 2-core VM) run in the first SIDE_METHOD_REPEATS repeats only, to keep `make bench` short.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import BenchSettings, child_parser, write_result
from benchmarks.s3 import create_bucket

DATASET_NAME = "clothing"
SIDE_METHOD_REPEATS = 2


def upload_photos(settings: BenchSettings, bucket: str) -> int:
    """Store the photos as a dataset version and as one object per photo; return the file count."""
    from fashion_gan.storage import open_store
    from fashion_gan.storage.datasets import upload_dataset

    data_dir = Path(settings.data_dir)
    files = sorted(path for path in data_dir.rglob("*") if path.is_file())
    prefix_store = open_store(f"s3://{bucket}/photos")
    prefix_store.upload_many([(path, path.relative_to(data_dir).as_posix()) for path in files], "set-up")
    upload_dataset(open_store(f"s3://{bucket}"), data_dir, DATASET_NAME)
    return len(files)


def timed(function, *arguments) -> float:
    started = time.perf_counter()
    function(*arguments)
    return time.perf_counter() - started


def boto3_one_by_one(bucket: str, dest_dir: Path) -> int:
    import boto3

    client = boto3.client("s3")
    count = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="photos/"):
        for item in page.get("Contents", []):
            target = dest_dir / item["Key"]
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, item["Key"], str(target))
            count += 1
    return count


def aws_s3_sync(aws: str, bucket: str, dest_dir: Path) -> None:
    subprocess.run([aws, "s3", "sync", f"s3://{bucket}/photos", str(dest_dir), "--endpoint-url",
                    os.environ["AWS_ENDPOINT_URL"], "--only-show-errors"], check=True)


def prefix_pull(bucket: str, cache_dir: Path) -> None:
    from fashion_gan.config import TrainConfig
    from fashion_gan.data.pull import pull_source

    config = TrainConfig()
    config.data.source = f"s3://{bucket}/photos"
    pull_source(config, cache_dir)


def count_files(folder: Path) -> int:
    return sum(1 for path in folder.rglob("*") if path.is_file())


def main(argv: list[str]) -> None:
    arguments = child_parser(__doc__.splitlines()[0]).parse_args(argv)
    settings = BenchSettings.from_json(arguments.settings)
    from fashion_gan.storage import open_store
    from fashion_gan.storage.datasets import pull_dataset

    bucket = f"bench-pull-{os.getpid()}"
    create_bucket(os.environ["AWS_ENDPOINT_URL"], bucket)
    file_count = upload_photos(settings, bucket)
    aws = shutil.which("aws")
    scratch = Path(settings.work_dir) / "pull"
    timings: dict[str, list[float]] = {"dataset_first_pull": [], "dataset_cached_pull": [], "prefix_pull": [],
                                       "boto3_one_by_one": [], "aws_s3_sync": []}
    checked_counts: dict[str, int] = {}
    for repeat in range(settings.repeats):
        folder = scratch / str(repeat)
        store = open_store(f"s3://{bucket}")
        dataset_cache = folder / "datasets"
        timings["dataset_first_pull"].append(timed(pull_dataset, store, DATASET_NAME, 1, dataset_cache))
        timings["dataset_cached_pull"].append(timed(pull_dataset, store, DATASET_NAME, 1, dataset_cache))
        checked_counts["dataset"] = count_files(dataset_cache / DATASET_NAME / "1")
        if repeat < SIDE_METHOD_REPEATS:
            timings["prefix_pull"].append(timed(prefix_pull, bucket, folder / "prefix"))
            checked_counts["prefix"] = count_files(folder / "prefix" / "downloads")
            timings["boto3_one_by_one"].append(timed(boto3_one_by_one, bucket, folder / "boto3"))
            checked_counts["boto3"] = count_files(folder / "boto3")
        if aws:
            timings["aws_s3_sync"].append(timed(aws_s3_sync, aws, bucket, folder / "aws"))
            checked_counts["aws"] = count_files(folder / "aws")
        shutil.rmtree(folder)
    write_result(arguments.result, {"timings": timings, "file_count": file_count, "checked_counts": checked_counts,
                                    "aws_cli": _aws_version(aws) if aws else None})


def _aws_version(aws: str) -> str:
    output = subprocess.run([aws, "--version"], capture_output=True, text=True)
    return (output.stdout or output.stderr).strip()


if __name__ == "__main__":
    main(sys.argv[1:])
