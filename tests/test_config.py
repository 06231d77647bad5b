"""Tests for server.config: precedence, per-model overrides, validation messages, --model parsing.

Real TOML files under tmp_path and plain dicts as the environment; no mocks, no torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
import tomllib

from server.config import (
    DEFAULT_MODELS,
    BatchingConfig,
    Config,
    ConfigError,
    DevicesConfig,
    Flags,
    ModelConfig,
    Placement,
    ServerSettings,
    WorkersConfig,
    load_config,
    parse_model_flag,
)
from server.models.spec import TensorSpec

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "config.toml") -> str:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def load(
    path: str | None = None, env: dict[str, str] | None = None, flags: Flags | None = None
) -> Config:
    return load_config(path, env or {}, flags or Flags())


def error(
    path: str | None = None, env: dict[str, str] | None = None, flags: Flags | None = None
) -> str:
    with pytest.raises(ConfigError) as info:
        load(path, env, flags)
    return str(info.value)


def builtins(batching: BatchingConfig) -> tuple[ModelConfig, ...]:
    return tuple(ModelConfig(n, f"builtin:{n}", "builtin", (), batching) for n in DEFAULT_MODELS)


DEFAULTS = Config(ServerSettings(), BatchingConfig(), WorkersConfig(), builtins(BatchingConfig()))


# --- defaults and the shipped files -----------------------------------------------------------


def test_no_file_no_env_no_flags_gives_the_defaults_and_the_builtins() -> None:
    assert load() == DEFAULTS


def test_default_toml_loads_to_exactly_the_defaults() -> None:
    assert load(str(REPO / "configs" / "default.toml")) == DEFAULTS


def test_default_toml_lists_every_setting() -> None:
    doc = tomllib.loads((REPO / "configs" / "default.toml").read_text())
    tables = {
        "server": ServerSettings,
        "batching": BatchingConfig,
        "workers": WorkersConfig,
        "devices": DevicesConfig,
    }
    assert set(doc) == set(tables)
    for table, cls in tables.items():
        assert set(doc[table]) == {f.name for f in fields(cls)}, table


def test_example_user_models_toml_parses_once_its_files_exist(tmp_path: Path) -> None:
    text = (REPO / "configs" / "example-user-models.toml").read_text()
    path = write(tmp_path, text, "configs/example.toml")
    for model in tomllib.loads(text)["models"].values():
        if not model["path"].startswith("builtin:"):
            touch(tmp_path / "configs" / model["path"])
    config = load(path)
    assert {m.format for m in config.models} >= {"torchscript", "export"}


# --- precedence: defaults < TOML < env < flags ------------------------------------------------

PRECEDENCE = [
    # table, key, TOML literal, env text, flag value, (toml, env, flag) expected
    ("server", "port", "9000", "9001", 9002, (9000, 9001, 9002)),
    ("server", "host", '"0.0.0.0"', "::1", "10.0.0.1", ("0.0.0.0", "::1", "10.0.0.1")),
    ("server", "uds", '"/a.sock"', "/b.sock", "/c.sock", ("/a.sock", "/b.sock", "/c.sock")),
    ("batching", "max_batch_size", "8", "16", 24, (8, 16, 24)),
    ("batching", "max_delay_ms", "2", "3.5", 0.25, (2.0, 3.5, 0.25)),
    ("batching", "max_queue_size", "100", "200", 300, (100, 200, 300)),
    ("batching", "timeout_ms", "100", "200", 300.0, (100.0, 200.0, 300.0)),
    ("workers", "cpu_workers", "2", "3", 4, (2, 3, 4)),
]

DEVICE_PRECEDENCE = [
    # key, TOML literal, env text, (toml, env) expected; the [devices] keys have no flags
    ("routing", '"cpu"', "cuda", ("cpu", "cuda")),
    ("cuda_instances", "2", "3", (2, 3)),
    ("half_precision", '"fp16"', "bf16", ("fp16", "bf16")),
    ("compile", "true", "no", (True, False)),
    ("calibration_cache", '"/a.json"', "", ("/a.json", "")),
    ("recalibrate", "true", "0", (True, False)),
]


@pytest.mark.parametrize(("key", "toml", "env", "expected"), DEVICE_PRECEDENCE)
def test_devices_settings_layer_toml_then_env(
    tmp_path: Path, key: str, toml: str, env: str, expected: tuple[object, object]
) -> None:
    path = write(tmp_path, f"[devices]\n{key} = {toml}\n")
    variables = {f"MICROBATCH_DEVICES_{key.upper()}": env}
    assert getattr(load(path).devices, key) == expected[0]
    assert getattr(load(path, variables).devices, key) == expected[1]


def test_model_placement_inherits_devices_then_own_then_operator(tmp_path: Path) -> None:
    text = """
        [devices]
        routing = "cpu"
        half_precision = "bf16"
        [models.a]
        path = "builtin:mlp"
        routing = "auto"
        cuda_instances = 2
        compile = true
        [models.b]
        path = "builtin:linear"
        """
    config = load(write(tmp_path, text))
    assert config.model("a").placement == Placement("auto", 2, "bf16", True)
    assert config.model("b").placement == Placement("cpu", 1, "bf16", False)
    forced = load(write(tmp_path, text), {"MICROBATCH_DEVICES_ROUTING": "cpu"})
    assert forced.model("a").placement == Placement("cpu", 2, "bf16", True)
    flagged = load(None, {"MICROBATCH_DEVICES_ROUTING": "cuda"}, Flags(models=("mlp",)))
    assert flagged.model("mlp").placement == Placement(routing="cuda")


def test_calibration_cache_expands_home_and_empty_means_none() -> None:
    assert DevicesConfig(calibration_cache="").resolved_calibration_cache() is None
    resolved = DevicesConfig().resolved_calibration_cache()
    assert resolved is not None and not resolved.startswith("~")
    assert resolved.endswith("microbatch/calibration.json")


@pytest.mark.parametrize(("table", "key", "toml", "env", "flag", "expected"), PRECEDENCE)
def test_each_layer_overrides_the_one_below(
    tmp_path: Path,
    table: str,
    key: str,
    toml: str,
    env: str,
    flag: object,
    expected: tuple[object, object, object],
) -> None:
    path = write(tmp_path, f"[{table}]\n{key} = {toml}\n")
    env_vars = {f"MICROBATCH_{table.upper()}_{key.upper()}": env}
    flags = Flags(**{key: flag})  # type: ignore[arg-type]
    assert getattr(getattr(load(path), table), key) == expected[0]
    assert getattr(getattr(load(path, env_vars), table), key) == expected[1]
    assert getattr(getattr(load(path, env_vars, flags), table), key) == expected[2]
    assert getattr(getattr(load(None, {}, flags), table), key) == expected[2]


def test_settings_without_flags_still_layer_toml_then_env(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [server]
        max_dims = 4
        access_log = true
        log_level = "debug"
        [workers]
        threads_per_worker = 2
        start_timeout_s = 5
        """,
    )
    config = load(path)
    assert (config.server.max_dims, config.server.access_log, config.server.log_level) == (
        4,
        True,
        "debug",
    )
    assert config.workers == WorkersConfig(threads_per_worker=2, start_timeout_s=5.0)
    env = {
        "MICROBATCH_SERVER_MAX_DIMS": "6",
        "MICROBATCH_SERVER_ACCESS_LOG": "no",
        "MICROBATCH_WORKERS_START_TIMEOUT_S": "7.5",
    }
    config = load(path, env)
    assert (config.server.max_dims, config.server.access_log) == (6, False)
    assert config.workers.start_timeout_s == 7.5
    assert config.workers.threads_per_worker == 2


def test_microbatch_config_names_the_file_unless_a_path_is_given(tmp_path: Path) -> None:
    from_env = write(tmp_path, "[server]\nport = 1111\n", "env.toml")
    given = write(tmp_path, "[server]\nport = 2222\n", "given.toml")
    assert load(None, {"MICROBATCH_CONFIG": from_env}).server.port == 1111
    assert load(given, {"MICROBATCH_CONFIG": from_env}).server.port == 2222


def test_unrelated_environment_variables_are_ignored() -> None:
    assert load(None, {"PATH": "/bin", "MICROBATCHX": "1", "HOME": "/root"}) == DEFAULTS


# --- environment values -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1", True), ("true", True), ("YES", True), ("0", False), ("False", False), ("no", False)],
)
def test_env_booleans(text: str, expected: bool) -> None:
    assert load(None, {"MICROBATCH_SERVER_ACCESS_LOG": text}).server.access_log is expected


def test_env_uds_mode_is_octal_and_empty_uds_clears_the_socket(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nuds = "/tmp/x.sock"\n')
    config = load(path, {"MICROBATCH_SERVER_UDS_MODE": "0660", "MICROBATCH_SERVER_UDS": ""})
    assert config.server.uds_mode == 0o660
    assert config.server.uds is None


def test_toml_uds_mode_takes_an_octal_int_or_an_octal_string(tmp_path: Path) -> None:
    assert load(write(tmp_path, "[server]\nuds_mode = 0o640\n")).server.uds_mode == 0o640
    assert load(write(tmp_path, '[server]\nuds_mode = "0644"\n')).server.uds_mode == 0o644


ENV_ERRORS = [
    ({"MICROBATCH_SERVER_PORT": "abc"}, "MICROBATCH_SERVER_PORT must be an integer, got 'abc'"),
    ({"MICROBATCH_SERVER_PORT": "70000"}, "MICROBATCH_SERVER_PORT must be in 0..65535, got 70000"),
    (
        {"MICROBATCH_BATCHING_MAX_DELAY_MS": "-1"},
        "MICROBATCH_BATCHING_MAX_DELAY_MS must be >= 0, got -1",
    ),
    ({"MICROBATCH_BATCHING_TIMEOUT_MS": "fast"}, "MICROBATCH_BATCHING_TIMEOUT_MS must be a number"),
    ({"MICROBATCH_BATCHING_TIMEOUT_MS": "inf"}, "MICROBATCH_BATCHING_TIMEOUT_MS must be a number"),
    ({"MICROBATCH_SERVER_ACCESS_LOG": "maybe"}, "MICROBATCH_SERVER_ACCESS_LOG must be a boolean"),
    ({"MICROBATCH_SERVER_UDS_MODE": "rw"}, "MICROBATCH_SERVER_UDS_MODE must be an octal mode"),
    ({"MICROBATCH_SERVER_LOG_LEVEL": "loud"}, "MICROBATCH_SERVER_LOG_LEVEL must be one of"),
    ({"MICROBATCH_WORKERS_CPU_WORKERS": "-2"}, "MICROBATCH_WORKERS_CPU_WORKERS must be >= 0"),
    (
        {"MICROBATCH_SERVER_PROT": "80"},
        "MICROBATCH_SERVER_PROT is not a setting; did you mean MICROBATCH_SERVER_PORT?",
    ),
    ({"MICROBATCH_CONFG": "x.toml"}, "did you mean MICROBATCH_CONFIG?"),
    ({"MICROBATCH_CONFIG": "/no/such/dir/x.toml"}, "config file /no/such/dir/x.toml"),
]


@pytest.mark.parametrize(("env", "message"), ENV_ERRORS)
def test_env_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    assert message in error(None, env)


FLAG_ERRORS = [
    (Flags(port=70000), "--port must be in 0..65535, got 70000"),
    (Flags(max_delay_ms=-1.0), "--max-delay-ms must be >= 0, got -1"),
    (Flags(max_batch_size=0), "--max-batch-size must be >= 1, got 0"),
    (Flags(max_queue_size=0), "--max-queue-size must be >= 1, got 0"),
    (Flags(timeout_ms=0.0), "--timeout-ms must be > 0, got 0"),
    (Flags(cpu_workers=-1), "--cpu-workers must be >= 0, got -1"),
]


@pytest.mark.parametrize(("flags", "message"), FLAG_ERRORS)
def test_flag_errors_name_the_flag(flags: Flags, message: str) -> None:
    assert error(None, None, flags) == message


# --- TOML validation --------------------------------------------------------------------------

TOML_ERRORS = [
    ("[batching]\nmax_delay_ms = -1", "batching.max_delay_ms must be >= 0, got -1"),
    ("[batching]\nmax_batch_size = 0", "batching.max_batch_size must be >= 1, got 0"),
    ("[batching]\nmax_batch_size = 1.5", "batching.max_batch_size must be an integer, got 1.5"),
    ("[batching]\nmax_queue_size = 0", "batching.max_queue_size must be >= 1, got 0"),
    ("[batching]\ntimeout_ms = 0", "batching.timeout_ms must be > 0, got 0"),
    ("[batching]\nmax_delay_ms = nan", "batching.max_delay_ms must be a number, got nan"),
    ("[batching]\nmax_delay_ms = true", "batching.max_delay_ms must be a number, got True"),
    ("[server]\nport = 70000", "server.port must be in 0..65535, got 70000"),
    ("[server]\nport = -1", "server.port must be in 0..65535, got -1"),
    ('[server]\nport = "80"', "server.port must be an integer, got '80'"),
    ("[server]\nport = true", "server.port must be an integer, got True"),
    ("[server]\nhost = 5", "server.host must be text, got 5"),
    ("[server]\naccess_log = 1", "server.access_log must be a boolean, got 1"),
    ('[server]\nlog_level = "loud"', "server.log_level must be one of debug, info, warning, error"),
    ("[server]\nuds_mode = 600", "server.uds_mode must be a mode in 0o000..0o777"),
    ('[server]\nuds_mode = "rw-"', "server.uds_mode must be an octal mode like '0600', got 'rw-'"),
    ("[server]\nmax_body_bytes = 0", "server.max_body_bytes must be >= 1, got 0"),
    ("[server]\nmax_elements = 0", "server.max_elements must be >= 1, got 0"),
    ("[server]\nmax_dims = 0", "server.max_dims must be >= 1, got 0"),
    ("[server]\ndrain_timeout_s = -1", "server.drain_timeout_s must be >= 0, got -1"),
    ("[server]\ndrain_delay_s = -0.5", "server.drain_delay_s must be >= 0, got -0.5"),
    ("[workers]\ncpu_workers = -1", "workers.cpu_workers must be >= 0, got -1"),
    ("[workers]\nthreads_per_worker = -1", "workers.threads_per_worker must be >= 0, got -1"),
    ("[workers]\nstart_timeout_s = 0", "workers.start_timeout_s must be > 0, got 0"),
    ('[devices]\nrouting = "gpu"', "devices.routing must be one of auto, cpu, cuda, got 'gpu'"),
    ("[devices]\ncuda_instances = 0", "devices.cuda_instances must be >= 1, got 0"),
    ('[devices]\nhalf_precision = "fp8"', "devices.half_precision must be one of off, fp16, bf16"),
    ('[devices]\ncompile = "yes"', "devices.compile must be a boolean, got 'yes'"),
    ("[devices]\nrecalibrate = 1", "devices.recalibrate must be a boolean, got 1"),
    ("server = 3", "server must be a table, got 3"),
    ("[server]\nprot = 80", "server.prot is not a setting; did you mean server.port?"),
    ("[batching]\nmax_dealy_ms = 1", "did you mean batching.max_delay_ms?"),
    ("[sever]\nport = 80", "sever is not a setting; did you mean server?"),
    ("[server]\nxyzzy = 1", "server.xyzzy is not a setting; known: host, port"),
    ("[server\nport = 80", "config file "),
]


@pytest.mark.parametrize(("text", "message"), TOML_ERRORS)
def test_toml_errors_name_the_dotted_key(tmp_path: Path, text: str, message: str) -> None:
    assert message in error(write(tmp_path, text + "\n"))


# --- models from TOML -------------------------------------------------------------------------


def test_toml_models_are_the_only_ones_served_with_their_formats_and_inputs(
    tmp_path: Path,
) -> None:
    touch(tmp_path / "a.pt")
    touch(tmp_path / "b.pt2")
    touch(tmp_path / "c.bin")
    path = write(
        tmp_path,
        """
        [models.a]
        path = "a.pt"
        input = { dtype = "float32", shape = [16] }
        [models.b]
        path = "b.pt2"
        [models.c]
        path = "c.bin"
        format = "export"
        inputs = { y = { dtype = "int64", shape = [2] }, x = { dtype = "bool", shape = [] } }
        [models.d]
        path = "builtin:mlp"
        """,
    )
    config = load(path)
    assert [m.name for m in config.models] == ["a", "b", "c", "d"]
    assert config.model("a") == ModelConfig(
        "a",
        str(tmp_path / "a.pt"),
        "torchscript",
        (TensorSpec("input", "float32", (16,)),),
        BatchingConfig(),
    )
    assert (config.model("b").format, config.model("b").inputs) == ("export", ())
    assert config.model("c").format == "export"
    assert config.model("c").inputs == (
        TensorSpec("y", "int64", (2,)),
        TensorSpec("x", "bool", ()),
    )
    assert (config.model("d").format, config.model("d").path) == ("builtin", "builtin:mlp")
    with pytest.raises(KeyError):
        config.model("linear")


def test_relative_model_paths_resolve_against_the_toml_directory(tmp_path: Path) -> None:
    model = touch(tmp_path / "models" / "m.pt2")
    path = write(tmp_path, '[models.m]\npath = "../models/m.pt2"\n', "conf/config.toml")
    assert load(path).model("m").path == str(model)


def test_model_batching_merges_defaults_table_and_own_overrides(tmp_path: Path) -> None:
    touch(tmp_path / "a.pt2")
    text = """
        [batching]
        max_delay_ms = 2
        max_batch_size = 8
        [models.a]
        path = "a.pt2"
        max_delay_ms = 7
        timeout_ms = 50
        [models.b]
        path = "builtin:linear"
        """
    config = load(write(tmp_path, text))
    assert config.batching == BatchingConfig(max_batch_size=8, max_delay_ms=2.0)
    assert config.model("a").batching == BatchingConfig(8, 7.0, 2048, 50.0)
    assert config.model("b").batching == config.batching


def test_env_and_flags_override_every_model_own_batching(tmp_path: Path) -> None:
    touch(tmp_path / "a.pt2")
    path = write(tmp_path, '[models.a]\npath = "a.pt2"\nmax_delay_ms = 7\nmax_batch_size = 4\n')
    env = {"MICROBATCH_BATCHING_MAX_DELAY_MS": "1"}
    assert load(path, env).model("a").batching == BatchingConfig(4, 1.0)
    flagged = load(path, env, Flags(max_delay_ms=0.5, max_queue_size=90))
    assert flagged.model("a").batching == BatchingConfig(4, 0.5, 90)
    assert flagged.batching == BatchingConfig(32, 0.5, 90)


def test_a_queue_smaller_than_a_full_batch_is_refused_naming_both_settings(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError, match=r"^batching.max_queue_size \(16\) must be >= "):
        load(None, {}, Flags(max_queue_size=16))
    touch(tmp_path / "a.pt2")
    path = write(tmp_path, '[models.a]\npath = "a.pt2"\nmax_batch_size = 64\nmax_queue_size = 50\n')
    with pytest.raises(ConfigError) as info:
        load(path, {})
    assert str(info.value) == (
        "models.a.max_queue_size (50) must be >= models.a.max_batch_size (64): a request of a "
        "full batch must fit in the queue"
    )


def model_toml(tmp_path: Path, body: str, name: str = "m") -> str:
    touch(tmp_path / "m.pt")
    return write(tmp_path, f"[models.{name}]\n" + textwrap.dedent(body))


MODEL_ERRORS = [
    ("format = 'export'", "models.m.path is required"),
    ("path = 5", "models.m.path must be text, got 5"),
    ("path = 'builtin:resnet'", "models.m.path: unknown built-in model 'builtin:resnet'"),
    ("path = 'm.pt'", "models.m: a TorchScript model needs `input` or `inputs`"),
    ("path = 'm.pt'\nformat = 'onnx'", "models.m.format must be one of builtin, torchscript"),
    ("path = 'm.pt'\nformat = 'builtin'", "models.m.format 'builtin' does not fit path"),
    ("path = 'builtin:mlp'\nformat = 'export'", "models.m.format 'export' does not fit path"),
    (
        "path = 'm.pt'\ninput = { dtype = 'float32', shape = [1] }\n"
        "inputs = { a = { dtype = 'float32', shape = [1] } }",
        "models.m: give `input` or `inputs`, not both",
    ),
    ("path = 'm.pt'\ninput = { dtype = 'float33', shape = [1] }", "models.m.input.dtype must be"),
    ("path = 'm.pt'\ninput = { shape = [1] }", "models.m.input.dtype must be one of"),
    (
        "path = 'm.pt'\ninput = { dtype = 'float32', shape = [0] }",
        "models.m.input.shape must be a list of integers >= 1 and at most one -1 (a length), "
        "got [0]",
    ),
    ("path = 'm.pt'\ninput = { dtype = 'float32', shape = [true] }", "models.m.input.shape"),
    ("path = 'm.pt'\ninput = { dtype = 'float32', shape = 3 }", "models.m.input.shape"),
    (
        "path = 'm.pt'\ninput = { dtpye = 'float32', shape = [3] }",
        "models.m.input.dtpye is not a setting; did you mean models.m.input.dtype?",
    ),
    ("path = 'm.pt'\ninput = 'float32[3]'", "models.m.input must be a table"),
    ("path = 'm.pt'\ninputs = { a = { dtype = 'x', shape = [3] } }", "models.m.inputs.a.dtype"),
    ("path = 'm.pt'\nmax_batch_size = 0", "models.m.max_batch_size must be >= 1, got 0"),
    ("path = 'm.pt'\nmax_dealy_ms = 1", "did you mean models.m.max_delay_ms?"),
    ("path = 'builtin:mlp'\nrouting = 'gpu'", "models.m.routing must be one of auto, cpu, cuda"),
    ("path = 'builtin:mlp'\ncuda_instances = 0", "models.m.cuda_instances must be >= 1, got 0"),
    ("path = 'builtin:mlp'\ncalibration_cache = ''", "models.m.calibration_cache is not a"),
]


@pytest.mark.parametrize(("body", "message"), MODEL_ERRORS)
def test_model_table_errors_name_the_dotted_key(tmp_path: Path, body: str, message: str) -> None:
    assert message in error(model_toml(tmp_path, body))


def test_missing_model_file_names_the_resolved_path(tmp_path: Path) -> None:
    path = write(tmp_path, "[models.foo]\npath = 'x/y.pt2'\n")
    assert error(path) == f"models.foo.path: no such file: {tmp_path / 'x' / 'y.pt2'}"


def test_model_names_are_restricted(tmp_path: Path) -> None:
    message = error(model_toml(tmp_path, "path = 'builtin:mlp'\n", name='"a b"'))
    assert message.startswith("models.a b: name 'a b'")
    models = "[models]\nm = 3\n"
    assert error(write(tmp_path, models)) == "models.m must be a table, got 3"


# --- --model flags ----------------------------------------------------------------------------


def test_model_flags_add_to_and_replace_config_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    touch(tmp_path / "a.pt2")
    touch(tmp_path / "n.pt")
    path = write(tmp_path, '[models.a]\npath = "a.pt2"\nmax_batch_size = 4\n')
    monkeypatch.chdir(tmp_path)  # --model paths are relative to the working directory
    flags = Flags(models=("a=builtin:linear", "n=n.pt:float32[3]", "mlp"))
    config = load(path, {}, flags)
    assert [m.name for m in config.models] == ["a", "n", "mlp"]
    # A --model replaces the whole model, per-model TOML overrides included.
    assert config.model("a") == ModelConfig("a", "builtin:linear", "builtin", (), BatchingConfig())
    assert config.model("n").path == str(tmp_path / "n.pt")
    assert config.model("n").inputs == (TensorSpec("input", "float32", (3,)),)
    assert config.model("mlp").path == "builtin:mlp"


def test_model_flags_get_the_global_batching() -> None:
    config = load(None, {}, Flags(max_batch_size=3, models=("linear",)))
    assert config.models == (
        ModelConfig("linear", "builtin:linear", "builtin", (), BatchingConfig(max_batch_size=3)),
    )


def test_a_lone_builtin_flag_serves_only_that_model() -> None:
    assert [m.name for m in load(None, {}, Flags(models=("mlp",))).models] == ["mlp"]


def test_model_flag_errors_name_the_flag(tmp_path: Path) -> None:
    text = f"m={tmp_path}/missing.pt:float32[3]"
    assert error(None, None, Flags(models=(text,))) == (
        f"--model {text!r}: no such file: {tmp_path}/missing.pt"
    )
    touch(tmp_path / "m.pt")
    text = f"m={tmp_path}/m.pt"
    assert error(None, None, Flags(models=(text,))).startswith(
        f"--model {text!r}: a TorchScript model needs"
    )


PARSED = [
    ("mlp", ("mlp", "builtin:mlp", ())),
    ("linear", ("linear", "builtin:linear", ())),
    ("m=builtin:mlp", ("m", "builtin:mlp", ())),
    ("m=/tmp/m.pt2", ("m", "/tmp/m.pt2", ())),
    ("m=rel/m.pt:float32[16]", ("m", "rel/m.pt", (TensorSpec("input", "float32", (16,)),))),
    ("m=/x.pt:x=uint8[]", ("m", "/x.pt", (TensorSpec("x", "uint8", ()),))),
    ("m.v2=/x.pt:bool[2, 3]", ("m.v2", "/x.pt", (TensorSpec("input", "bool", (2, 3)),))),
    (
        "m=/tmp/m.pt:a=float32[3,4];b=int64[2]",
        ("m", "/tmp/m.pt", (TensorSpec("a", "float32", (3, 4)), TensorSpec("b", "int64", (2,)))),
    ),
    ("m=/a:b/m.pt:float16[1]", ("m", "/a:b/m.pt", (TensorSpec("input", "float16", (1,)),))),
]


@pytest.mark.parametrize(("text", "expected"), PARSED)
def test_parse_model_flag_forms(
    text: str, expected: tuple[str, str, tuple[TensorSpec, ...]]
) -> None:
    assert parse_model_flag(text) == expected


FLAG_PARSE_ERRORS = [
    ("resnet", "'resnet' is not one of ('linear', 'mlp', 'encoder')"),
    ("=a.pt", "name '' may use only"),
    ("a b=a.pt", "name 'a b' may use only"),
    ("x=", "PATH is empty"),
    ("x=:float32[3]", "PATH is empty"),
    (
        "x=y.pt:float32[a]",
        "input.shape must be a list of integers >= 1 and at most one -1 (a length), got ['a']",
    ),
    (
        "x=y.pt:float32[0]",
        "input.shape must be a list of integers >= 1 and at most one -1 (a length), got [0]",
    ),
    ("x=y.pt:float99[3]", "input.dtype must be one of float16"),
    ("x=y.pt:a=float99[3]", "a.dtype must be one of"),
    ("x=y.pt:float32", "bad input spec"),
    ("x=y.pt:float32[3", "bad input spec"),
    ("x=y.pt:float32[3];int8[2]", "name each of several inputs"),
    ("x=y.pt:a=float32[3];a=int8[2]", "an input name is repeated"),
]


@pytest.mark.parametrize(("text", "message"), FLAG_PARSE_ERRORS)
def test_parse_model_flag_errors_name_the_flag(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_model_flag(text)
    assert str(info.value).startswith(f"--model {text!r}: ")
    assert message in str(info.value)


def test_unknown_builtin_path_in_a_flag() -> None:
    message = error(None, None, Flags(models=("m=builtin:resnet",)))
    assert message.startswith("--model 'm=builtin:resnet': unknown built-in model")


# --- workers, lookup, redaction, imports ------------------------------------------------------


@pytest.mark.parametrize(
    ("workers", "cores", "expected"),
    [
        (WorkersConfig(), 8, (7, 1)),
        (WorkersConfig(), 1, (1, 1)),
        (WorkersConfig(), 2, (1, 1)),
        (WorkersConfig(cpu_workers=2), 8, (2, 3)),
        (WorkersConfig(cpu_workers=2, threads_per_worker=5), 8, (2, 5)),
        (WorkersConfig(cpu_workers=16), 4, (16, 1)),
    ],
)
def test_workers_resolve_auto_values_from_the_core_count(
    workers: WorkersConfig, cores: int, expected: tuple[int, int]
) -> None:
    assert (workers.resolved_cpu_workers(cores), workers.resolved_threads(cores)) == expected


def test_redacted_is_plain_data_and_masks_secrets() -> None:
    @dataclass(frozen=True)
    class WithToken(ServerSettings):
        auth_token: str = "hunter2"

    plain = DEFAULTS.redacted()
    json.dumps(plain)  # plain data only
    assert plain["server"] == {
        f.name: getattr(ServerSettings(), f.name) for f in fields(ServerSettings)
    }
    secret = Config(WithToken(), BatchingConfig(), WorkersConfig(), ()).redacted()
    assert secret["server"]["auth_token"] == "***"  # type: ignore[index]
    assert "hunter2" not in json.dumps(secret)


def test_importing_config_loads_neither_torch_nor_aiohttp() -> None:
    code = "import sys, server.config; print(sorted({'torch', 'aiohttp'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert result.stdout.strip() == "[]"


# --- reliability and security settings --------------------------------------------------------


def test_on_model_failure_takes_exit_or_serve_others(tmp_path: Path) -> None:
    assert load().server.on_model_failure == "exit"
    env = {"MICROBATCH_SERVER_ON_MODEL_FAILURE": "serve_others"}
    assert load(env=env).server.on_model_failure == "serve_others"
    path = write(tmp_path, '[server]\non_model_failure = "ignore"\n')
    assert error(path) == "server.on_model_failure must be one of exit, serve_others, got 'ignore'"


@pytest.mark.parametrize("key", ["MAX_MSGPACK_DEPTH", "MAX_MSGPACK_ITEMS", "MAX_MSGPACK_STR_BYTES"])
def test_msgpack_limits_are_at_least_one(key: str) -> None:
    assert error(env={f"MICROBATCH_SERVER_{key}": "0"}) == (
        f"MICROBATCH_SERVER_{key} must be >= 1, got 0"
    )


def test_auth_token_from_the_environment_or_a_file(tmp_path: Path) -> None:
    assert load().server.auth_token is None
    assert load(env={"MICROBATCH_SERVER_AUTH_TOKEN": "abc"}).server.auth_token == "abc"
    assert load(env={"MICROBATCH_SERVER_AUTH_TOKEN": ""}).server.auth_token is None
    token_file = tmp_path / "token"
    token_file.write_text("  from-a-file\n")
    path = write(tmp_path, f'[server]\nauth_token_file = "{token_file}"\n')
    assert load(path).server.auth_token == "from-a-file"


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "server.auth_token_file: cannot read"), ("\n", "is empty")],
)
def test_a_token_file_that_is_missing_or_empty_stops_start_up(
    tmp_path: Path, content: str | None, message: str
) -> None:
    token_file = tmp_path / "token"
    if content is not None:
        token_file.write_text(content)
    assert message in error(env={"MICROBATCH_SERVER_AUTH_TOKEN_FILE": str(token_file)})


def test_a_token_and_a_token_file_together_are_an_error(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("x")
    env = {
        "MICROBATCH_SERVER_AUTH_TOKEN": "y",
        "MICROBATCH_SERVER_AUTH_TOKEN_FILE": str(token_file),
    }
    assert "both set" in error(env=env)


def test_the_token_is_redacted_in_the_logged_config() -> None:
    secret = load(env={"MICROBATCH_SERVER_AUTH_TOKEN": "hunter2"}).redacted()
    assert secret["server"]["auth_token"] == "***"  # type: ignore[index]
    assert "hunter2" not in json.dumps(secret)


def test_kubernetes_service_link_variables_are_not_taken_for_settings() -> None:
    env = {
        "MICROBATCH_SERVICE_HOST": "10.0.0.7",
        "MICROBATCH_SERVICE_PORT": "8080",
        "MICROBATCH_SERVICE_PORT_HTTP": "8080",
        "MICROBATCH_PORT": "tcp://10.0.0.7:8080",
        "MICROBATCH_PORT_8080_TCP": "tcp://10.0.0.7:8080",
        "MICROBATCH_PORT_8080_TCP_PROTO": "tcp",
        "MICROBATCH_PORT_8080_TCP_PORT": "8080",
        "MICROBATCH_PORT_8080_TCP_ADDR": "10.0.0.7",
        "MICROBATCH_PREDICTOR_SERVICE_HOST": "10.0.0.8",  # KServe's microbatch-predictor
        "MICROBATCH_PREDICTOR_PORT_80_TCP_ADDR": "10.0.0.8",
        "MICROBATCH_SERVER_PORT": "9000",
    }
    assert load(None, env).server.port == 9000
    with pytest.raises(ConfigError, match="MICROBATCH_SERVER_PROT is not a setting"):
        load(None, {"MICROBATCH_SERVER_PROT": "9000"})
