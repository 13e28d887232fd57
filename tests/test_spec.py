"""floyd.yml parsing, validation and resolution into a JobSpec."""

from __future__ import annotations

from pathlib import Path

import pytest

from fashion_gan.errors import ConfigError
from fashion_gan.runner.backend import InputMount, MachineSpec, parse_machine
from fashion_gan.runner.distributed import multi_node_envs, sagemaker_distributed_env, torch_distributed_env
from fashion_gan.runner.jobs import JOB_ID_PATTERN, new_job_id
from fashion_gan.runner.spec import RunOptions, load_floyd_config, parse_floyd_text, parse_input, resolve_job

REPO_ROOT = Path(__file__).resolve().parents[1]
JOB_ID = "fg-0000000001"

FLOYD_TEXT = """\
env: fashion-gan:latest
machine: cpu
command: python train.py experiment=fashion_photos
description: top level
max_runtime: 3600
output: s3://bucket/prefix
env_vars: [WANDB_API_KEY]
input:
  - source: clothing/2
    destination: photos
sagemaker:
  role_arn: arn:aws:iam::123456789012:role/top
  region: eu-west-1
task:
  smoke:
    machine: gpu
    description: smoke task
    command: python train.py debug=smoke
    sagemaker:
      region: us-east-1
"""


def resolve(text: str = FLOYD_TEXT, options: RunOptions | None = None, tmp_path: Path = Path("/project")):
    config = parse_floyd_text(text, tmp_path / "floyd.yml")
    return resolve_job(config, options or RunOptions(), JOB_ID)


def test_top_level_values_without_task():
    resolved = resolve()
    assert resolved.backend == "local"
    assert resolved.spec.machine == MachineSpec("cpu", 0)
    assert resolved.spec.description == "top level"
    assert resolved.spec.max_runtime_s == 3600
    assert resolved.spec.image == "fashion-gan:latest"


def test_task_block_overrides_top_level():
    spec = resolve(options=RunOptions(task="smoke")).spec
    assert spec.machine == MachineSpec("gpu", 1)
    assert spec.description == "smoke task"
    assert spec.command[:3] == ["python", "train.py", "debug=smoke"]
    # Keys the task leaves out keep their top-level values.
    assert spec.max_runtime_s == 3600


def test_flag_overrides_task_block():
    options = RunOptions(task="smoke", machine="cpu", description="from flag", inputs=["other/5:x"])
    spec = resolve(options=options).spec
    assert spec.machine == MachineSpec("cpu", 0)
    assert spec.description == "from flag"
    assert spec.inputs == [InputMount("other/5", "x")]


def test_defaults_for_empty_file():
    spec = resolve(text="", options=RunOptions()).spec
    assert spec.machine.name == "cpu"
    assert spec.command[:2] == ["python", "train.py"]
    assert spec.output_uri == "/project/outputs"
    assert spec.max_runtime_s is None
    assert spec.instance_count == 1


def test_backend_blocks_merge_key_by_key():
    options = RunOptions(task="smoke", backend="sagemaker")
    resolved = resolve(options=options)
    assert resolved.backend == "sagemaker"
    assert resolved.spec.backend_options == {
        "role_arn": "arn:aws:iam::123456789012:role/top",
        "region": "us-east-1",
    }


def test_runner_overrides_appended_then_cli_overrides():
    spec = resolve(options=RunOptions(hydra_overrides=["trainer.max_steps=3", "run.output=/elsewhere"])).spec
    assert spec.command == [
        "python", "train.py", "experiment=fashion_photos",
        f"run.id={JOB_ID}", "run.output=s3://bucket/prefix", "data.source=dataset:clothing/2",
        "trainer.max_steps=3", "run.output=/elsewhere",
    ]
    assert spec.env["FASHION_GAN_RUN_ID"] == JOB_ID


def test_multi_node_adds_num_nodes_override():
    spec = resolve(text="instance_count: 2\n").spec
    assert spec.instance_count == 2
    assert "trainer.num_nodes=2" in spec.command


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("fashion/3:photos", InputMount("fashion/3", "photos")),
        ("fashion", InputMount("fashion", "data")),
        ("s3://bucket/photos:photos", InputMount("s3://bucket/photos", "photos")),
        ("s3://bucket/photos", InputMount("s3://bucket/photos", "data")),
        ("jobs/fg-abcdefghij:previous", InputMount("jobs/fg-abcdefghij", "previous")),
        ({"source": "fashion/3", "destination": "photos"}, InputMount("fashion/3", "photos")),
        ({"source": "fashion"}, InputMount("fashion", "data")),
    ],
)
def test_input_shorthand_and_long_form(entry, expected):
    assert parse_input(entry) == expected


def test_input_shorthand_in_file():
    spec = resolve(text="input: ['fashion/4:photos', {source: other, destination: o}]\n").spec
    assert spec.inputs == [InputMount("fashion/4", "photos"), InputMount("other", "o")]
    assert "data.source=dataset:fashion/4" in spec.command


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("fashion/3", "data.source=dataset:fashion/3"),
        ("fashion", "data.source=dataset:fashion"),
        ("s3://bucket/images", "data.source=s3://bucket/images"),
        ("./data/train", "data.source=/project/data/train"),
        ("jobs/fg-abcdefghij", "data.source=s3://bucket/prefix/runs/fg-abcdefghij"),
    ],
)
def test_data_source_override_per_source_kind(source, expected):
    spec = resolve(options=RunOptions(inputs=[f"{source}:x"])).spec
    assert expected in spec.command


def test_input_with_invalid_source_rejected():
    with pytest.raises(ConfigError, match="invalid input source 'Not A Dataset'"):
        resolve(options=RunOptions(inputs=["Not A Dataset:x"]))


def test_unknown_top_level_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown key 'machin'.*did you mean 'machine'\?"):
        parse_floyd_text("machin: gpu\n", Path("floyd.yml"))


def test_unknown_task_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown key 'comand' in task 'smoke'.*did you mean 'command'\?"):
        parse_floyd_text("task:\n  smoke:\n    comand: x\n", Path("floyd.yml"))


def test_unknown_backend_block_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown key 'role_ar'.*did you mean 'role_arn'\?"):
        parse_floyd_text("sagemaker:\n  role_ar: x\n", Path("floyd.yml"))


def test_unknown_input_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown key 'destnation'.*did you mean 'destination'\?"):
        parse_floyd_text("input:\n  - {source: a, destnation: b}\n", Path("floyd.yml"))


def test_unknown_task_name_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown task 'smok'.*did you mean 'smoke'\?"):
        resolve(options=RunOptions(task="smok"))


def test_unknown_backend_lists_known():
    with pytest.raises(ConfigError, match=r"unknown backend 'dockr' \(did you mean 'docker'\?\); known backends: docker, local, sagemaker"):
        resolve(options=RunOptions(backend="dockr"))


def test_bad_yaml_reports_line_and_column():
    text = "machine: cpu\ncommand: [python, train.py\ndescription: x\n"
    with pytest.raises(ConfigError) as caught:
        parse_floyd_text(text, Path("floyd.yml"))
    message = str(caught.value)
    assert message.startswith("floyd.yml:3:")
    assert "line 3, column" in message


def test_bad_yaml_from_file_names_the_file(tmp_path):
    path = tmp_path / "floyd.yml"
    path.write_text("env: a\n  machine: b\n")
    with pytest.raises(ConfigError, match=rf"{path}:2:\d+: invalid YAML at line 2, column \d+"):
        load_floyd_config(path)


def test_duplicate_key_rejected():
    with pytest.raises(ConfigError, match="duplicate key 'machine'"):
        parse_floyd_text("machine: cpu\nmachine: gpu\n", Path("floyd.yml"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_runtime: soon\n", "invalid value 'soon' for 'max_runtime'"),
        ("max_runtime: true\n", "invalid value True for 'max_runtime'"),
        ("spot: 1\n", "invalid value 1 for 'spot'"),
        ("env_vars: {WANDB_API_KEY: secret}\n", "invalid value"),
        ("env_vars: ['WANDB_API_KEY=secret']\n", "list variable NAMES only"),
    ],
)
def test_wrong_value_types_rejected(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_floyd_text(text, Path("floyd.yml"))


def test_non_positive_max_runtime_rejected():
    with pytest.raises(ConfigError, match="invalid max_runtime"):
        resolve(text="max_runtime: 0\n")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("cpu", MachineSpec("cpu", 0)), ("gpu", MachineSpec("gpu", 1)), ("gpu2", MachineSpec("gpu2", 2)),
     ("GPU4", MachineSpec("gpu4", 4)), ("gpu1", MachineSpec("gpu", 1))],
)
def test_parse_machine(text, expected):
    assert parse_machine(text) == expected


@pytest.mark.parametrize("text", ["tpu", "gpu0", "cpu2", "gpu-2", ""])
def test_parse_machine_rejects_invalid(text):
    with pytest.raises(ConfigError, match="invalid machine"):
        parse_machine(text)


def test_job_ids_are_valid_sagemaker_and_wandb_ids():
    ids = {new_job_id() for _ in range(200)}
    assert len(ids) == 200
    for job_id in ids:
        assert JOB_ID_PATTERN.match(job_id)
        assert len(job_id) <= 63  # SageMaker TrainingJobName limit
        assert job_id.replace("-", "").isalnum()  # W&B run ids: letters, digits, hyphens


def test_shipped_floyd_file_resolves():
    config = load_floyd_config(REPO_ROOT / "floyd.yml")
    main = resolve_job(config, RunOptions(), JOB_ID).spec
    smoke = resolve_job(config, RunOptions(task="smoke"), JOB_ID).spec
    assert main.command[:3] == ["python", "train.py", "experiment=fashion_photos"]
    assert "debug=smoke" in smoke.command
    assert "experiment=fashion_photos" in smoke.command
    assert smoke.machine.name == "cpu"
    assert main.output_uri == str(REPO_ROOT / "outputs")


def test_torch_distributed_env_two_nodes():
    hosts = ["algo-1", "algo-2"]
    first = torch_distributed_env(hosts, "algo-1", gpus_per_host=4, port=29400)
    second = torch_distributed_env(hosts, "algo-2", gpus_per_host=4, port=29400)
    assert first["NODE_RANK"] == "0"
    assert second["NODE_RANK"] == "1"
    for env in (first, second):
        assert env["MASTER_ADDR"] == "algo-1"
        assert env["MASTER_PORT"] == "29400"
        assert env["WORLD_SIZE"] == "8"
        assert env["NUM_NODES"] == "2"


def test_sagemaker_distributed_env_from_sm_variables():
    environ = {"SM_HOSTS": '["algo-1", "algo-2"]', "SM_CURRENT_HOST": "algo-2", "SM_NUM_GPUS": "1"}
    env = sagemaker_distributed_env(environ)
    assert env is not None
    assert env["NODE_RANK"] == "1"
    assert env["WORLD_SIZE"] == "2"
    assert env["MASTER_ADDR"] == "algo-1"


def test_sagemaker_distributed_env_absent_or_single_host():
    assert sagemaker_distributed_env({}) is None
    assert sagemaker_distributed_env({"SM_HOSTS": '["algo-1"]', "SM_CURRENT_HOST": "algo-1"}) is None


def test_two_node_docker_job_envs():
    envs = multi_node_envs(JOB_ID, node_count=2, gpus_per_host=1)
    assert [env["NODE_RANK"] for env in envs] == ["0", "1"]
    assert all(env["WORLD_SIZE"] == "2" for env in envs)
    assert all(env["MASTER_ADDR"] == f"{JOB_ID}-node-0" for env in envs)


def test_distributed_env_rejects_unknown_host():
    with pytest.raises(ConfigError, match="not in the host list"):
        torch_distributed_env(["algo-1"], "algo-9", gpus_per_host=1)


def test_null_backend_options_mean_default():
    resolved = resolve(text="backend: docker\ndocker:\n  host: null\n  network_mode: host\n")
    assert resolved.spec.backend_options == {"network_mode": "host"}


@pytest.mark.parametrize("backend", ["local", "docker", "sagemaker"])
def test_option_key_table_matches_backend_class(backend):
    from fashion_gan.runner.backend import backend_class
    from fashion_gan.runner.spec import BACKEND_OPTION_KEYS

    if backend == "docker":
        pytest.importorskip("docker", reason="the Docker SDK is not installed")
    assert BACKEND_OPTION_KEYS[backend] == backend_class(backend).known_options


@pytest.mark.parametrize(
    "value",
    ["s3://bucket/prefix", "dataset:clothing/2", "/tmp/it's here/out", "/tmp/x,y/[z]", "/tmp/a=b",
     "/tmp/back\\slash", "/tmp/ends\\", "/tmp/\\'x", "/tmp/a@b%c~d+e"],
)
def test_hydra_value_round_trips_through_parser(value):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from fashion_gan.runner.spec import hydra_value

    override = OverridesParser.create().parse_override(f"run.output={hydra_value(value)}")
    assert override.value() == value


def test_output_path_with_quote_is_quoted(tmp_path):
    folder = tmp_path / "it's a project"
    spec = resolve(text="input: ['./photos:p']\n", tmp_path=folder).spec
    assert f"run.output='{folder}/outputs'".replace("it's", "it\\'s") in spec.command


def test_docker_options_all_accepted_and_context_resolved(tmp_path):
    text = """\
backend: docker
docker:
  build: true
  build_args: {APP_UID: "1000"}
  context: ./image
  dockerfile: docker/Dockerfile
  host: ssh://deploy@gpu-box
  network_mode: host
  use_ssh_client: true
  user: "1000:1000"
"""
    options = resolve(text=text, tmp_path=tmp_path).spec.backend_options
    assert options["context"] == str(tmp_path / "image")
    assert options["dockerfile"] == "docker/Dockerfile"
    assert set(options) == {"build", "build_args", "context", "dockerfile", "host", "network_mode",
                            "use_ssh_client", "user"}


def test_docker_absolute_context_kept(tmp_path):
    options = resolve(text="backend: docker\ndocker:\n  context: /srv/image\n", tmp_path=tmp_path).spec.backend_options
    assert options["context"] == "/srv/image"
