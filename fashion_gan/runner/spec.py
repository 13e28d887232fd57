"""floyd.yml: parse, validate and resolve into a `JobSpec`.

FloydHub keys keep their FloydHub meaning: `env` is the image, `machine` is `cpu`, `gpu` or
`gpuN`, `input` lists data sources, `command` is the training command, `task:` holds named
blocks selected with `--task`. The project adds `backend`, `output`, `env_vars`, `spot`,
`shm_size_gb`, `tags`, `instance_count` and one options block per backend.

Precedence for every value: command-line flag > task block > top level > default.
"""

from __future__ import annotations

import difflib
import logging
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fashion_gan.errors import ConfigError
from fashion_gan.runner.backend import BACKEND_MODULES, InputMount, JobSpec, parse_machine

log = logging.getLogger(__name__)

DEFAULT_FLOYD_FILE = "floyd.yml"
DEFAULT_IMAGE = "fashion-gan:latest"
DEFAULT_COMMAND = "python train.py"
DEFAULT_BACKEND = "local"
DEFAULT_MACHINE = "cpu"
DEFAULT_OUTPUT = "outputs"  # relative to the folder of floyd.yml
DEFAULT_SHM_SIZE_GB = 1.0
DEFAULT_INPUT_DESTINATION = "data"

# Value type of each key allowed at the top level and inside a task block.
_JOB_KEY_TYPES: dict[str, tuple[type, ...]] = {
    "env": (str,),
    "machine": (str,),
    "input": (list, str),
    "command": (str, list),
    "description": (str,),
    "max_runtime": (int,),
    "backend": (str,),
    "output": (str,),
    "env_vars": (list,),
    "spot": (bool,),
    "shm_size_gb": (int, float),
    "tags": (list,),
    "instance_count": (int,),
    "local": (dict,),
    "docker": (dict,),
    "sagemaker": (dict,),
}
TOP_LEVEL_KEYS = frozenset(_JOB_KEY_TYPES) | {"task"}
TASK_KEYS = frozenset(_JOB_KEY_TYPES)
INPUT_KEYS = frozenset({"source", "destination"})
# Keys of each backend's options block; each backend class also rejects unknown options itself.
BACKEND_OPTION_KEYS: dict[str, frozenset[str]] = {
    "local": frozenset({"workdir", "grace_period_s"}),
    "docker": frozenset({"build", "build_args", "context", "dockerfile", "host", "network_mode", "use_ssh_client",
                         "user"}),
    "sagemaker": frozenset({"role_arn", "instance_types", "region", "max_wait"}),
}

_ENV_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DATASET_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]*(/[0-9]+)?$")
_JOB_OUTPUT_PATTERN = re.compile(r"^jobs/(fg-[0-9a-z]{10})/?$")
_URI_PATTERN = re.compile(r"^[a-z][a-z0-9+.-]*://")
# Values Hydra's override grammar reads literally without quotes. Other characters (spaces, quotes,
# commas, brackets, `=`, `~`) would change the meaning or fail to parse, so such values are quoted.
_HYDRA_PLAIN_VALUE = re.compile(r"^[A-Za-z0-9_\-+./:@%]+$")


@dataclass
class FloydConfig:
    """A validated floyd.yml: the top-level block and the named task blocks."""

    path: Path
    top: dict[str, Any]
    tasks: dict[str, dict[str, Any]]

    @property
    def base_dir(self) -> Path:
        return self.path.resolve().parent


@dataclass
class RunOptions:
    """Command-line values of `fashion-gan run`; `None` means "not given on the command line"."""

    task: str | None = None
    machine: str | None = None
    inputs: list[str] | None = None
    backend: str | None = None
    description: str | None = None
    hydra_overrides: list[str] = field(default_factory=list)


@dataclass
class ResolvedJob:
    backend: str
    spec: JobSpec


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key repeated in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _closest_hint(name: str, known: frozenset[str] | set[str]) -> str:
    matches = difflib.get_close_matches(str(name), sorted(known), n=1)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def _reject_unknown_keys(block: dict[str, Any], known: frozenset[str], where: str) -> None:
    for key in block:
        if key not in known:
            raise ConfigError(
                f"unknown key {key!r} in {where}{_closest_hint(key, known)}; known keys: {', '.join(sorted(known))}"
            )


def _check_types(block: dict[str, Any], where: str) -> None:
    for key, value in block.items():
        expected = _JOB_KEY_TYPES[key]
        # bool is an int in Python, so `max_runtime: true` must not pass as a number.
        wrong_bool = isinstance(value, bool) and bool not in expected
        if wrong_bool or not isinstance(value, expected):
            names = " or ".join(kind.__name__ for kind in expected)
            raise ConfigError(f"invalid value {value!r} for {key!r} in {where}: expected {names}")
    for backend, known in BACKEND_OPTION_KEYS.items():
        if backend in block:
            _reject_unknown_keys(block[backend], known, f"the {backend!r} block of {where}")
    if "input" in block:
        _parse_inputs(block["input"], f"input of {where}")
    env_vars = block.get("env_vars", [])
    for name in env_vars:
        if not isinstance(name, str) or not _ENV_NAME_PATTERN.match(name):
            raise ConfigError(
                f"invalid env_vars entry {name!r} in {where}: list variable NAMES only (like WANDB_API_KEY); "
                "their values are read from your shell when the job is submitted and never written to a file"
            )


def parse_floyd_text(text: str, path: Path) -> FloydConfig:
    """Parse and validate floyd.yml text; `path` names the file in messages and anchors relative paths."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        problem = err.problem or err.context or "invalid YAML"
        if mark is None:
            raise ConfigError(f"{path}: invalid YAML: {problem}") from err
        line, column = mark.line + 1, mark.column + 1  # PyYAML marks count from 0
        raise ConfigError(
            f"{path}:{line}:{column}: invalid YAML at line {line}, column {column}: {problem}; fix the file and retry"
        ) from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys such as env, machine, command; got {type(data).__name__}")

    _reject_unknown_keys(data, TOP_LEVEL_KEYS, str(path))
    top = {key: value for key, value in data.items() if key != "task"}
    _check_types(top, str(path))

    tasks_block = data.get("task") or {}
    if not isinstance(tasks_block, dict):
        raise ConfigError(f"invalid 'task' in {path}: expected a mapping of task names to blocks")
    tasks: dict[str, dict[str, Any]] = {}
    for task_name, block in tasks_block.items():
        where = f"task {task_name!r} of {path}"
        if not isinstance(block, dict):
            raise ConfigError(f"invalid {where}: expected a mapping of keys such as command, machine")
        _reject_unknown_keys(block, TASK_KEYS, where)
        _check_types(block, where)
        tasks[str(task_name)] = block
    return FloydConfig(path=path, top=top, tasks=tasks)


def load_floyd_config(path: Path | str = DEFAULT_FLOYD_FILE) -> FloydConfig:
    """Read and validate a floyd.yml file."""
    file_path = Path(path)
    try:
        text = file_path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{file_path} not found; run from the project folder or pass --file") from None
    except OSError as err:
        raise ConfigError(f"failed to read {file_path}: {err}") from err
    return parse_floyd_text(text, file_path)


def parse_input(entry: Any, where: str = "input") -> InputMount:
    """Parse one input: `{source, destination}` or the shorthand `"source:destination"`.

    The shorthand splits at the last colon unless what follows is the `//` of a URI scheme, so
    `s3://bucket/photos:photos` and `s3://bucket/photos` both work. A missing destination is `data`.
    """
    if isinstance(entry, dict):
        _reject_unknown_keys(entry, INPUT_KEYS, where)
        source = entry.get("source")
        if not isinstance(source, str) or not source:
            raise ConfigError(f"missing 'source' in {where}: give a dataset (NAME/N), jobs/<id> or a URI")
        destination = entry.get("destination", DEFAULT_INPUT_DESTINATION)
        if not isinstance(destination, str) or not destination:
            raise ConfigError(f"invalid 'destination' {destination!r} in {where}: expected a folder name")
        return InputMount(source=source, destination=destination)
    if isinstance(entry, str) and entry:
        source, separator, destination = entry.rpartition(":")
        if not separator or destination.startswith("//") or not source:
            return InputMount(source=entry, destination=DEFAULT_INPUT_DESTINATION)
        return InputMount(source=source, destination=destination or DEFAULT_INPUT_DESTINATION)
    raise ConfigError(f"invalid {where} {entry!r}: expected 'source:destination' or {{source, destination}}")


def _parse_inputs(value: Any, where: str) -> list[InputMount]:
    entries = [value] if isinstance(value, str) else list(value)
    return [parse_input(entry, f"{where} entry {index}") for index, entry in enumerate(entries)]


def _merge_blocks(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return `base` updated by `override`; nested mappings (backend blocks) merge key by key."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge_blocks(merged[key], value)
        else:
            merged[key] = value
    return merged


def _resolve_local_path(text: str, base_dir: Path) -> str:
    path = Path(text).expanduser()
    return str(path if path.is_absolute() else (base_dir / path).resolve())


def resolve_output_uri(text: str, base_dir: Path) -> str:
    """Return the output root as a URI, or as an absolute path for a plain local path."""
    if _URI_PATTERN.match(text):
        return text.rstrip("/")
    return _resolve_local_path(text, base_dir)


def data_source_for(mount: InputMount, output_uri: str, base_dir: Path,
                    job_output_uri: Callable[[str], str | None] | None = None) -> str:
    """Return the `data.source=` value that train.py reads for one input.

    A dataset `NAME/N` or `NAME` becomes `dataset:NAME/N` (latest version for `NAME`), an earlier
    job `jobs/<id>` becomes `<that job's output>/runs/<id>`, a URI stays as is and any other text is
    a local path, made absolute against the folder of floyd.yml.
    """
    source = mount.source
    job_match = _JOB_OUTPUT_PATTERN.match(source)
    if job_match:
        earlier_id = job_match.group(1)
        earlier_output = job_output_uri(earlier_id) if job_output_uri else None
        return f"{earlier_output or output_uri}/runs/{earlier_id}"
    if _URI_PATTERN.match(source):
        return source
    if source.startswith((".", "/", "~")):
        return _resolve_local_path(source, base_dir)
    if _DATASET_PATTERN.match(source):
        return f"dataset:{source}"
    raise ConfigError(
        f"invalid input source {source!r}: expected a dataset (NAME or NAME/N, lower case), "
        "jobs/<job id>, a URI (s3://…, file://…) or a local path starting with ./ or /"
    )


def hydra_value(text: str) -> str:
    """Return `text` as a Hydra override value, single-quoted when it contains special characters.

    Inside quotes Hydra treats a backslash as an escape only before a quote or the closing quote,
    so only those backslashes are doubled.
    """
    if _HYDRA_PLAIN_VALUE.match(text):
        return text
    escaped = re.sub(r"(\\*)'", lambda match: match.group(1) * 2 + "\\'", text)
    escaped = re.sub(r"(\\+)$", lambda match: match.group(1) * 2, escaped)
    return f"'{escaped}'"


def build_command(base_command: str | list[str], job_id: str, output_uri: str,
                  data_source: str | None, hydra_overrides: list[str], instance_count: int = 1,
                  tags: list[str] | None = None) -> list[str]:
    """Return the training command with the runner's Hydra overrides, then the user's, appended.

    The user's overrides come last, so Hydra lets them replace the runner's values. The `tags` of
    floyd.yml become `logger.tags=[...]`, the W&B tags of the run; a `logger.tags=` override on the
    command line replaces them.
    """
    command = shlex.split(base_command) if isinstance(base_command, str) else [str(part) for part in base_command]
    if not command:
        raise ConfigError("empty 'command' in floyd.yml: give the training command, e.g. 'python train.py'")
    command += [f"run.id={job_id}", f"run.output={hydra_value(output_uri)}"]
    if data_source is not None:
        command.append(f"data.source={hydra_value(data_source)}")
    if instance_count > 1:
        command.append(f"trainer.num_nodes={instance_count}")
    if tags:
        command.append(f"logger.tags=[{','.join(hydra_value(str(tag)) for tag in tags)}]")
    return command + list(hydra_overrides)


def _effective_values(config: FloydConfig, options: RunOptions) -> dict[str, Any]:
    values = dict(config.top)
    if options.task is not None:
        if options.task not in config.tasks:
            known = ", ".join(sorted(config.tasks)) or "none defined"
            raise ConfigError(
                f"unknown task {options.task!r} in {config.path}{_closest_hint(options.task, set(config.tasks))}; "
                f"known tasks: {known}"
            )
        values = _merge_blocks(values, config.tasks[options.task])
    flags = {
        "machine": options.machine,
        "input": options.inputs,
        "backend": options.backend,
        "description": options.description,
    }
    values.update({key: value for key, value in flags.items() if value is not None})
    return values


def _positive(value: int | float | None, key: str) -> None:
    if value is not None and value <= 0:
        raise ConfigError(f"invalid {key} {value!r}: expected a positive number")


def resolve_job(config: FloydConfig, options: RunOptions, job_id: str,
                job_output_uri: Callable[[str], str | None] | None = None) -> ResolvedJob:
    """Combine floyd.yml and the command line into the backend name and a `JobSpec`.

    `job_output_uri(job_id)` returns an earlier job's output root, for `jobs/<id>` inputs.
    """
    values = _effective_values(config, options)
    backend = values.get("backend", DEFAULT_BACKEND)
    if backend not in BACKEND_MODULES:
        raise ConfigError(
            f"unknown backend {backend!r}{_closest_hint(backend, set(BACKEND_MODULES))}; "
            f"known backends: {', '.join(sorted(BACKEND_MODULES))}"
        )
    # `null` in a backend block means "not set": the backend's default applies.
    backend_options = {key: value for key, value in values.get(backend, {}).items() if value is not None}
    if backend == "local":
        workdir = backend_options.get("workdir", ".")
        backend_options["workdir"] = _resolve_local_path(str(workdir), config.base_dir)
    if backend == "docker" and "context" in backend_options:
        backend_options["context"] = _resolve_local_path(str(backend_options["context"]), config.base_dir)

    machine = parse_machine(values.get("machine", DEFAULT_MACHINE))
    inputs = _parse_inputs(values.get("input", []), "input")
    output_uri = resolve_output_uri(values.get("output", DEFAULT_OUTPUT), config.base_dir)
    data_source = data_source_for(inputs[0], output_uri, config.base_dir, job_output_uri) if inputs else None
    if len(inputs) > 1:
        log.warning("train.py reads only the first input (%s) as data.source; it does not receive the others",
                    inputs[0].source)

    max_runtime_s = values.get("max_runtime")
    shm_size_gb = float(values.get("shm_size_gb", DEFAULT_SHM_SIZE_GB))
    instance_count = values.get("instance_count", 1)
    _positive(max_runtime_s, "max_runtime (seconds)")
    _positive(shm_size_gb, "shm_size_gb")
    _positive(instance_count, "instance_count")

    tags = [str(tag) for tag in values.get("tags", [])]
    spec = JobSpec(
        job_id=job_id,
        image=values.get("env", DEFAULT_IMAGE),
        command=build_command(values.get("command", DEFAULT_COMMAND), job_id, output_uri, data_source,
                              options.hydra_overrides, instance_count, tags),
        machine=machine,
        env={"FASHION_GAN_RUN_ID": job_id, "PYTHONUNBUFFERED": "1"},
        env_passthrough=list(dict.fromkeys(values.get("env_vars", []))),
        inputs=inputs,
        output_uri=output_uri,
        description=values.get("description", ""),
        max_runtime_s=max_runtime_s,
        spot=values.get("spot", False),
        shm_size_gb=shm_size_gb,
        instance_count=instance_count,
        backend_options=backend_options,
        tags=tags,
    )
    return ResolvedJob(backend=backend, spec=spec)
