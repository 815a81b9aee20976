"""`flux2-lora launch MANIFEST --dry-run` on bad manifests: every mistake is one line, exit code 2, naming the
field (and, for a value of the wrong type or shape, the manifest file); nothing is written and no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from flux2_lora.cli import main
from tests.conftest import run_cli

PREFIX = "flux2-lora: error: "
R = "resources"

# (id, manifest text after `recipe: tiny` and `output: OUT`, start of the message after PREFIX, names the file)
FIELDS: list[tuple[str, str, str, bool]] = [
    # sections that must be mappings
    ("resources-list", f"{R}: [1, 2]", "resources: must be a mapping of nodes, gpus_per_node", True),
    ("resources-number", f"{R}: 5", "resources: must be a mapping of nodes", True),
    ("resources-string", f"{R}: lots", "resources: must be a mapping of nodes", True),
    ("resources-null", f"{R}:", "resources: must be a mapping of nodes", True),
    ("slurm-number", "slurm: 5", "slurm: must be a mapping of script, job_name", True),
    ("slurm-list", "slurm: [a]", "slurm: must be a mapping of script", True),
    ("slurm-null", "slurm: null", "slurm: must be a mapping of script", True),
    ("ray-string", "ray: fast", "ray: must be a mapping of address", True),
    ("ray-null", "ray:", "ray: must be a mapping of address", True),
    ("env-list", "env: [A, B]", "env: must be a mapping of environment variables", True),
    ("env-string", "env: A=1", "env: must be a mapping of environment variables", True),
    ("env-null", "env:", "env: must be a mapping of environment variables", True),
    ("overrides-list", "overrides: [training.max_steps]", "overrides: must be a mapping of dotted recipe fields", True),
    ("overrides-string", "overrides: x", "overrides: must be a mapping of dotted recipe fields", True),
    ("overrides-null", "overrides:", "overrides: must be a mapping of dotted recipe fields", True),
    ("tune_args-string", "command: tune\ntune_args: --trials 4", "tune_args: must be a list of strings", True),
    ("tune_args-mapping", "command: tune\ntune_args: {a: 1}", "tune_args: must be a list of strings", True),
    ("sbatch_args-string", "slurm: {sbatch_args: --qos=high}", "slurm.sbatch_args: must be a list of strings", True),
    ("setup-string", "slurm: {setup: module load cuda}", "slurm.setup: must be a list of strings", True),
    # unknown keys, with the known ones
    ("unknown-top", "resourcez: {nodes: 1}", "resourcez: not a manifest field (expected one of backend, command", True),
    ("unknown-resources", f"{R}: {{gpus: 1}}", "resources.gpus: not a manifest field (expected one of account", True),
    ("unknown-slurm", "slurm: {jobname: x}", "slurm.jobname: not a manifest field (expected one of job_name", True),
    ("unknown-ray", "ray: {adress: x}", "ray.adress: not a manifest field (expected one of address", True),
    ("number-key", "5: x", "5: not a manifest field", True),
    ("null-key", "null: x", "null: not a manifest field", True),
    ("anchor-wrong-section", f"{R}: &a {{nodes: 1}}\nslurm: *a", "slurm.nodes: not a manifest field", True),
    # counts: whole, finite, in range
    ("nodes-negative", f"{R}: {{nodes: -3}}", "resources.nodes: must be at least 1 (got -3)", False),
    ("nodes-zero", f"{R}: {{nodes: 0}}", "resources.nodes: must be at least 1 (got 0)", False),
    ("nodes-fraction", f"{R}: {{nodes: 1.5}}", "resources.nodes: must be a whole number (got a number: 1.5)", True),
    ("nodes-string", f"{R}: {{nodes: two}}", 'resources.nodes: must be a whole number (got a string: "two")', True),
    ("nodes-quoted", f"{R}: {{nodes: '2'}}", 'resources.nodes: must be a whole number (got a string: "2"', True),
    ("nodes-1e3", f"{R}: {{nodes: 1e3}}", 'resources.nodes: must be a whole number (got a string: "1e3"', True),
    ("nodes-bool", f"{R}: {{nodes: true}}", "resources.nodes: must be a whole number (got true/false: true)", True),
    ("nodes-null", f"{R}: {{nodes: null}}", "resources.nodes: must be a whole number (got null)", True),
    ("nodes-nan", f"{R}: {{nodes: .nan}}", "resources.nodes: must be a finite whole number (got nan)", True),
    ("nodes-inf", f"{R}: {{nodes: .inf}}", "resources.nodes: must be a finite whole number (got inf)", True),
    ("nodes-huge", f"{R}: {{nodes: 100000000000000000000000}}", "resources.nodes: must be at most 10000", False),
    ("nodes-local-many", f"{R}: {{nodes: 17}}", "resources.nodes: the local backend starts one launcher", False),
    ("nodes-ray-train", f"backend: ray\n{R}: {{nodes: 2}}", "resources.nodes: a training run as a Ray job", False),
    ("gpus-negative", f"{R}: {{gpus_per_node: -1}}", "resources.gpus_per_node: must be 0 or more (got -1)", False),
    ("gpus-huge", f"{R}: {{gpus_per_node: 99999999999}}", "resources.gpus_per_node: must be at most 64", False),
    ("gpus-list", f"{R}: {{gpus_per_node: [1]}}", "resources.gpus_per_node: must be a whole number (got a list", True),
    ("processes-zero", f"{R}: {{processes_per_node: 0}}", "resources.processes_per_node: must be at least 1", False),
    (
        "processes-over-gpus",
        f"{R}: {{gpus_per_node: 1, processes_per_node: 2}}",
        "resources.processes_per_node: 2 processes on 1 GPU(s)",
        False,
    ),
    ("cpus-negative", f"{R}: {{cpus_per_task: -1}}", "resources.cpus_per_task: must be at least 1 (got -1)", False),
    ("cpus-huge", f"{R}: {{cpus_per_task: 1000000}}", "resources.cpus_per_task: must be at most 10000", False),
    # time limits and memory
    ("time-number", f"{R}: {{time: 3600}}", "resources.time: must be a Slurm time in quotes", True),
    ("time-unquoted", f"{R}:\n  time: 24:00:00", "resources.time: must be a Slurm time in quotes", True),
    ("time-words", f"{R}: {{time: tomorrow}}", "resources.time: must be a Slurm time like 24:00:00", False),
    ("time-minutes-99", f"{R}: {{time: '25:99:99'}}", "resources.time: must be a Slurm time like", False),
    ("time-hours-24-after-days", f"{R}: {{time: '1-24:00'}}", "resources.time: must be a Slurm time like", False),
    ("time-empty", f"{R}: {{time: ''}}", "resources.time: must not be empty", True),
    ("time-list", f"{R}: {{time: [1]}}", "resources.time: must be a string (got a list: [1])", True),
    ("mem-number", f"{R}: {{mem: 512}}", 'resources.mem: must be a size in quotes, like "512G"', True),
    ("mem-unit", f"{R}: {{mem: 512GB}}", "resources.mem: must be like 512G or 0 (got 512GB)", False),
    ("partition-number", f"{R}: {{partition: 5}}", "resources.partition: must be a string (got a number: 5)", True),
    # choices
    ("backend-unknown", "backend: k8s", 'backend: must be one of local, slurm, ray (got "k8s")', True),
    ("backend-number", "backend: 5", "backend: must be one of local, slurm, ray (got a number: 5)", True),
    ("backend-null", "backend: null", "backend: must be one of local, slurm, ray (got null)", True),
    ("strategy-list", "strategy: [ddp]", "strategy: must be one of ddp, fsdp, zero2, zero3", True),
    ("command-unknown", "command: serve", "command: must be one of train, tune", True),
    ("mixed_precision-fp8", "mixed_precision: fp8", "mixed_precision: must be one of auto, no, bf16, fp16", True),
    ("offload-disk", "offload: disk", "offload: must be one of none, optimizer, all", True),
    ("offload-without-zero", "offload: optimizer", "offload: only zero2 and zero3 offload", False),
    ("script-unknown", "slurm: {script: triple}", "slurm.script: must be one of auto, single-node, multi-node", True),
    ("script-single-2-nodes", f"{R}: {{nodes: 2}}\nslurm: {{script: single-node}}", "slurm.script: single-node", False),
    # other scalars
    ("main_port-string", "main_port: http", 'main_port: must be a whole number (got a string: "http")', True),
    ("main_port-huge", "main_port: 70000", "main_port: must be a port number (got 70000)", False),
    ("main_port-nan", "main_port: .nan", "main_port: must be a finite whole number (got nan)", True),
    ("main_port-fraction", "main_port: 29500.5", "main_port: must be a whole number", True),
    ("resume-string", "resume: maybe", 'resume: must be true or false (got a string: "maybe")', True),
    ("shard_base-number", "shard_base: 2", "shard_base: must be true or false (got a number: 2)", True),
    ("python-number", "python: 3", "python: must be a string (got a number: 3)", True),
    ("python-list", "python: [a]", "python: must be a string (got a list", True),
    # slurm options
    ("signal-negative", "slurm: {signal_seconds: -1}", "slurm.signal_seconds: must be 0 or more (got -1)", False),
    ("signal-nan", "slurm: {signal_seconds: .nan}", "slurm.signal_seconds: must be a finite whole number", True),
    ("signal-string", "slurm: {signal_seconds: soon}", "slurm.signal_seconds: must be a whole number", True),
    ("signal-huge", "slurm: {signal_seconds: 70000}", "slurm.signal_seconds: must be at most 65535", False),
    ("restarts-negative", "slurm: {max_restarts: -1}", "slurm.max_restarts: must be 0 or more (got -1)", False),
    ("sbatch_args-number", "slurm: {sbatch_args: [1, 2]}", "slurm.sbatch_args[0]: must be a string", True),
    ("sbatch_args-not-option", "slurm: {sbatch_args: [qos=high]}", "slurm.sbatch_args[0]: must be an sbatch option", False),
    ("job_name-newline", 'slurm: {job_name: "a\\nb"}', "slurm.job_name: must be one line", True),
    ("job_name-empty", "slurm: {job_name: ''}", "slurm.job_name: must not be empty", True),
    # ray options
    ("ray-gpus-negative", "ray: {entrypoint_num_gpus: -1}", "ray.entrypoint_num_gpus: must be 0 or more", False),
    ("ray-gpus-nan", "ray: {entrypoint_num_gpus: .nan}", "ray.entrypoint_num_gpus: must be a finite number", True),
    ("ray-cpus-inf", "ray: {entrypoint_num_cpus: .inf}", "ray.entrypoint_num_cpus: must be a finite number", True),
    ("ray-cpus-1e9", "ray: {entrypoint_num_cpus: 1e9}", "ray.entrypoint_num_cpus: must be a number", True),
    ("ray-address-number", "ray: {address: 5}", "ray.address: must be a string", True),
    ("ray-no_wait-string", "ray: {no_wait: maybe}", "ray.no_wait: must be true or false", True),
    # environment
    ("env-nan", "env: {A: .nan}", "env.A: must be a string, number or boolean (got a number: nan)", True),
    ("env-inf", "env: {A: .inf}", "env.A: must be a string, number or boolean (got a number: inf)", True),
    ("env-null-value", "env: {A: null}", "env.A: must be a string, number or boolean (got null)", True),
    ("env-mapping-value", "env: {A: {b: 1}}", "env.A: must be a string, number or boolean", True),
    ("env-list-value", "env: {A: [1, 2]}", "env.A: must be a string, number or boolean", True),
    ("env-binary-value", "env: {A: !!binary aGVsbG8=}", "env.A: must be a string, number or boolean", True),
    ("env-bad-name", "env: {1A: x}", "env.1A: not a valid environment variable name", False),
    ("env-number-name", "env: {1: x}", "env.1: the name must be a string", True),
    # overrides
    ("override-number-key", "overrides: {5: x}", "overrides.5: the name must be a string", True),
    ("override-not-dotted", "overrides: {Training: 5}", "overrides.Training: must be a dotted recipe field", False),
    ("override-nan", "overrides: {training.max_grad_norm: .nan}", "overrides.training.max_grad_norm: must be a finite", True),
    ("override-inf-in-list", "overrides: {validation.prompts: [.inf]}", "overrides.validation.prompts[0]: must be a", True),
    ("override-date", "overrides: {validation.prompts: [2024-01-01]}", "overrides.validation.prompts[0]: must be", True),
    ("override-holds-itself", "overrides: {validation.prompts: &a [*a]}", "overrides.validation.prompts: holds itself", True),
    ("override-cycle", "overrides: {validation.prompts: &a [[*a]]}", "overrides.validation.prompts: nests lists", True),
    ("override-distributed", "overrides: {distributed.strategy: ddp}", "overrides.distributed.strategy: set by", False),
    ("override-unknown-field", "overrides: {training.max_stepz: 3}", "overrides.training.max_stepz: not a recipe", False),
    ("override-wrong-type", "overrides: {training.max_steps: many}", "overrides.training.max_steps: must be an int", False),
    # tune
    ("tune_args-number", "command: tune\ntune_args: [--trials, 4]", 'tune_args[1]: must be a string (got a number: 4; quote it: "4")', True),
    ("tune_args-with-train", "tune_args: [--trials, '4']", "tune_args: only with command: tune", False),
    ("tune_args-output", "command: tune\ntune_args: [--output, x]", "tune_args: --output is set by the launcher", False),
    ("tune-fsdp", "command: tune\nstrategy: fsdp", "strategy: a sweep runs each trial as one process", False),
]  # fmt: skip

# (id, the whole manifest (OUT: the output folder, TMP: the test's folder), start of the message after PREFIX)
FILES: list[tuple[str, str, str]] = [
    ("empty-file", "", "MANIFEST: {path} must be a YAML mapping of manifest fields (got an empty file)"),
    ("comments-only", "# nothing here\n", "MANIFEST: {path} must be a YAML mapping of manifest fields"),
    ("top-list", "- recipe\n- tiny\n", "MANIFEST: {path} must be a YAML mapping of manifest fields (got a list)"),
    ("top-string", "hello\n", "MANIFEST: {path} must be a YAML mapping of manifest fields (got a string)"),
    ("top-number", "5\n", "MANIFEST: {path} must be a YAML mapping of manifest fields (got a number)"),
    ("not-yaml", "recipe: tiny\nresources: {nodes: 1\n", "MANIFEST: {path} line 3 is not valid YAML"),
    ("tab-indent", "recipe: tiny\nresources:\n\tnodes: 1\n", "MANIFEST: {path} line 3 is not valid YAML"),
    ("python-tag", "recipe: !!python/object:os.system {}\n", "MANIFEST: {path} line 1 is not valid YAML"),
    ("list-as-key", "recipe: tiny\n? [a, b]\n: x\n", "MANIFEST: {path} line 2: a key must be a plain name, not a list"),
    ("no-recipe", "output: OUT\n", "recipe: required: a recipe YAML file or a preset name (base"),
    ("no-output", "recipe: tiny\n", "output: required: the output folder"),
    ("recipe-null", "recipe:\noutput: OUT\n", "recipe: must be a string (got null)"),
    ("recipe-number", "recipe: 5\noutput: OUT\n", "recipe: must be a string (got a number: 5)"),
    ("recipe-empty", "recipe: ''\noutput: OUT\n", "recipe: must not be empty"),
    ("recipe-unknown-preset", "recipe: no-such-preset\noutput: OUT\n", "recipe: no-such-preset is neither a recipe"),
    ("recipe-file-missing", "recipe: TMP/nope.yaml\noutput: OUT\n", "recipe: TMP/nope.yaml does not exist"),
    ("recipe-relative-missing", "recipe: nope/r.yaml\noutput: OUT\n", "recipe: nope/r.yaml does not exist (a relative"),
    ("recipe-folder", "recipe: TMP\noutput: OUT\n", "recipe: TMP is a folder, not a recipe YAML file"),
    ("recipe-unknown-user", "recipe: ~no-such-user-x/r.yaml\noutput: OUT\n", "recipe: ~no-such-user-x/r.yaml: no such"),
    ("output-empty", "recipe: tiny\noutput: ''\n", "output: must not be empty"),
    ("output-list", "recipe: tiny\noutput: [a]\n", "output: must be a string (got a list"),
    ("output-unknown-user", "recipe: tiny\noutput: ~no-such-user-x/o\n", "output: ~no-such-user-x/o: no such"),
    ("output-is-a-file", "recipe: tiny\noutput: TMP/a-file\n", "output: "),
]  # fmt: skip


def _launch(text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, Path]:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(text.replace("OUT", str(tmp_path / "out")).replace("TMP", str(tmp_path)))
    (tmp_path / "a-file").write_text("not a folder")
    code = main(["launch", str(manifest), "--dry-run", *extra])
    return code, capsys.readouterr().err, manifest


def _one_line(code: int, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), err
    return lines[0][len(PREFIX) :]


@pytest.mark.parametrize("body, expected, names_file", [c[1:] for c in FIELDS], ids=[c[0] for c in FIELDS])
def test_bad_field(
    body: str, expected: str, names_file: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err, manifest = _launch(f"recipe: tiny\noutput: OUT\n{body}\n", tmp_path, capsys)
    message = _one_line(code, err)
    assert message.startswith(expected), message
    if names_file:
        assert message.endswith(f" in {manifest}"), message
    assert not (tmp_path / "out" / "launch").exists()


@pytest.mark.parametrize("text, expected", [c[1:] for c in FILES], ids=[c[0] for c in FILES])
def test_bad_file(text: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err, manifest = _launch(text, tmp_path, capsys)
    message = _one_line(code, err)
    assert message.startswith(expected.replace("{path}", str(manifest)).replace("TMP", str(tmp_path))), message
    assert not (tmp_path / "out" / "launch").exists()


def test_case_ids_are_unique() -> None:
    ids = [c[0] for c in FIELDS] + [c[0] for c in FILES]
    assert len(ids) == len(set(ids))


def test_duplicate_key_names_the_file_and_both_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = "recipe: tiny\noutput: OUT\nresources:\n  nodes: 1\n  gpus_per_node: 0\n  nodes: 2\n"
    code, err, manifest = _launch(text, tmp_path, capsys)
    assert _one_line(code, err) == f"MANIFEST: {manifest} line 6: duplicate key 'nodes' (first at line 4)"
    code, err, manifest = _launch("recipe: tiny\noutput: OUT\nrecipe: style\n", tmp_path, capsys)
    assert _one_line(code, err) == f"MANIFEST: {manifest} line 3: duplicate key 'recipe' (first at line 1)"


def test_alias_bomb_is_refused_without_expanding_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """10**9 values through aliases: refused after the first 100000, in well under a second of work."""
    lines = ["recipe: tiny", "output: OUT", "overrides:", "  validation.a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"  validation.a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    code, err, manifest = _launch("\n".join(lines) + "\n", tmp_path, capsys)
    assert "holds more than 100000 values" in _one_line(code, err)
    code, err, _ = _launch("recipe: tiny\noutput: OUT\nx: &a [*a]\nresources: *a\n", tmp_path, capsys)
    assert _one_line(code, err).startswith("x: not a manifest field")


def test_output_on_the_command_line_stands_in_for_a_missing_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err, _ = _launch("recipe: tiny\n", tmp_path, capsys, "--output", str(tmp_path / "cli-out"))
    assert code == 0, err
    assert (tmp_path / "cli-out" / "launch" / "accelerate_config.yaml").exists()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("resources: [1, 2]\n", "resources: must be a mapping of nodes, gpus_per_node"),
        ("slurm: 5\n", "slurm: must be a mapping of script, job_name"),
        ("resources:\n  nodes: 1\n  nodes: 2\n", "line 5: duplicate key 'nodes' (first at line 4)"),
    ],
    ids=["resources-list", "slurm-number", "duplicate-key"],
)
def test_the_reported_crashes_are_one_line_from_the_command_line(text: str, expected: str, tmp_path: Path) -> None:
    """The tester's cases, as a user runs them: a subprocess, its whole stderr."""
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"recipe: tiny\noutput: {tmp_path / 'out'}\n{text}")
    res = run_cli("launch", str(manifest), "--dry-run", timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith(PREFIX) and expected in res.stderr, res.stderr
    assert str(manifest) in res.stderr
