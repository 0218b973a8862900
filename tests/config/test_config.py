"""Unit tests for parsl_chat.config: layers, sources, errors with file:line, secrets, profiles."""

from __future__ import annotations

import pickle
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from parsl_chat.config import (
    REDACTED,
    AgentConfig,
    LimitsConfig,
    ProfileConfig,
    RunConfig,
    Secret,
    ServerConfig,
    Settings,
    find_profile,
    list_profiles,
    load_settings,
    parse_max_failures,
    read_yaml,
    shipped_configs_dir,
)
from parsl_chat.errors import ConfigError

KEY = "sk-test-SUPERSECRET-0123456789"


@pytest.fixture(autouse=True)
def no_user_profiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """User profiles come from $XDG_CONFIG_HOME: point it at an empty folder so the host's don't leak in."""
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    return xdg / "parsl-chat" / "profiles"


def yml(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def load(
    tmp_path: Path,
    profile: str = "executor: local\n",
    config: str = "",
    env: dict[str, str] | None = None,
    cli: dict[str, Any] | None = None,
) -> Settings:
    return load_settings(
        profile=str(yml(tmp_path, "profile.yaml", profile)),
        config_file=yml(tmp_path, "config.yaml", config),
        cli=cli,
        env=env or {},
    )


def error(tmp_path: Path, **kw: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, **kw)
    assert info.value.exit_code == 2
    return str(info.value)


# --------------------------------------------------------------------------- defaults and layers


def test_defaults(tmp_path: Path) -> None:
    settings = load(tmp_path)
    assert settings.profile == ProfileConfig(name="profile")  # name defaults to the file's stem
    assert settings.run == RunConfig()
    assert settings.run.limits == LimitsConfig()
    assert settings.run.server == ServerConfig()
    assert settings.run.agents == ()
    assert settings.run.agent_count == 3
    assert settings.run.max_failures == "0"
    assert settings.source_of("limits.timeout_s").kind == "default"
    assert settings.source_of("agent_count").kind == "default"
    assert settings.source_of("no.such.key").kind == "default"
    assert str(settings.source_of("endpoint")) == "default"
    assert settings.files == [tmp_path / "profile.yaml", tmp_path / "config.yaml"]


def test_shipped_local_profile_and_agents(tmp_path: Path) -> None:
    settings = load_settings("local", env={})
    assert settings.profile.name == "local"
    assert settings.profile.executor == "local"
    assert [a.name for a in settings.run.agents] == ["analyst", "teacher", "summarizer"]
    assert settings.run.agents[0].params == {"temperature": 0.2, "max_tokens": 96}
    # concurrency is not pinned: agents on the embedded server share its slots (llama_build.embedded_slots_share)
    assert settings.run.limits.concurrency == 4 and settings.source_of("limits.concurrency").kind == "default"
    src = settings.source_of("limits.timeout_s")
    assert src.kind == "yaml"
    assert src.detail.startswith(str(shipped_configs_dir() / "agents.yaml") + ":")
    assert settings.files[0] == shipped_configs_dir() / "local.yaml"


@pytest.mark.parametrize("name", ["local", "slurm", "slurm-allocation", "kubernetes"])
def test_every_shipped_profile_loads(name: str) -> None:
    settings = load_settings(name, env={})
    assert settings.profile.name == name
    assert settings.profile.executor == name


def test_profile_yaml_values_and_sources(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        profile="""
        name: cluster
        description: test
        executor: slurm
        partition: gpu
        workers: 3
        walltime: "02:00:00"
        exclusive: yes
        mem_per_node_gb: 64
        """,
    )
    p = settings.profile
    assert (p.name, p.executor, p.partition, p.workers, p.walltime, p.exclusive) == (
        "cluster",
        "slurm",
        "gpu",
        3,
        "02:00:00",
        True,
    )
    assert p.mem_per_node_gb == 64.0 and isinstance(p.mem_per_node_gb, float)
    src = settings.source_of("profile.workers")
    assert (src.kind, src.detail) == ("yaml", f"{tmp_path / 'profile.yaml'}:5")
    assert str(src) == f"yaml ({tmp_path / 'profile.yaml'}:5)"


def test_kubernetes_profile_values(tmp_path: Path) -> None:
    settings = load(tmp_path, profile="executor: kubernetes\nnode_selector: {kubernetes.io/arch: amd64}\npod_cpu: 2\n")
    assert settings.profile.node_selector == {"kubernetes.io/arch": "amd64"}
    assert settings.profile.pod_cpu == "2"  # a number in YAML, a string for Kubernetes


def test_unquoted_walltime_stays_a_string(tmp_path: Path) -> None:
    """YAML 1.1 would read 12:00:00 as 43200 (base 60), which SLURM would take as 43200 minutes."""
    settings = load(tmp_path, profile="executor: slurm\nwalltime: 12:00:00\n")
    assert settings.profile.walltime == "12:00:00"
    settings = load(tmp_path, profile="executor: slurm\nwalltime: 1:30\n")
    assert settings.profile.walltime == "1:30"
    assert load(tmp_path, profile="executor: local\nworkers: 12\n").profile.workers == 12


def test_config_file_values(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        config="""
        endpoint: http://h:8000/v1
        model: m
        agent_count: 5
        routing: least_loaded
        max_failures: 2%
        limits:
          concurrency: 8
          timeout_s: 30
        server:
          kind: none
        cost:
          su_per_node_hour: 1.5
        agents:
          - name: a
            weight: 2
            params: {temperature: 0}
          - name: b
            concurrency: 1
            model: other
        """,
    )
    run = settings.run
    assert (run.endpoint, run.model, run.agent_count, run.routing, run.max_failures) == (
        "http://h:8000/v1",
        "m",
        5,
        "least_loaded",
        "2%",
    )
    assert run.limits.concurrency == 8 and run.limits.timeout_s == 30.0 and run.limits.max_attempts == 4
    assert run.server.kind == "none"
    assert run.cost.su_per_node_hour == 1.5
    assert run.agents == (
        AgentConfig(name="a", weight=2.0, params={"temperature": 0}),
        AgentConfig(name="b", concurrency=1, model="other"),
    )
    cfg = tmp_path / "config.yaml"
    assert settings.source_of("limits.timeout_s").detail == f"{cfg}:8"
    assert settings.source_of("agents.a.weight").detail == f"{cfg}:15"
    assert settings.source_of("agents.b.model").detail == f"{cfg}:19"
    assert settings.source_of("routing").detail == f"{cfg}:4"


def test_config_profile_section_overrides_profile_file(tmp_path: Path) -> None:
    settings = load(tmp_path, profile="executor: local\nworkers: 2\n", config="profile:\n  workers: 6\n")
    assert settings.profile.workers == 6
    assert settings.source_of("profile.workers").detail == f"{tmp_path / 'config.yaml'}:2"


def test_env_over_yaml(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        profile="executor: local\nworkers: 3\n",
        config="limits:\n  timeout_s: 10\nagent_count: 2\n",
        env={
            "PARSL_CHAT_WORKERS": "7",
            "PARSL_CHAT_LIMITS_TIMEOUT_S": "9.5",
            "PARSL_CHAT_AGENTS": "5",
            "OPENAI_BASE_URL": "http://env:1/v1",
            "OPENAI_API_KEY": KEY,
            "HOME": "/ignored",
        },
    )
    assert settings.profile.workers == 7
    assert settings.run.limits.timeout_s == 9.5
    assert settings.run.agent_count == 5
    assert settings.run.endpoint == "http://env:1/v1"
    assert settings.run.api_key == Secret(KEY)
    for key, var in [
        ("profile.workers", "PARSL_CHAT_WORKERS"),
        ("limits.timeout_s", "PARSL_CHAT_LIMITS_TIMEOUT_S"),
        ("agent_count", "PARSL_CHAT_AGENTS"),
        ("endpoint", "OPENAI_BASE_URL"),
        ("api_key", "OPENAI_API_KEY"),
    ]:
        src = settings.source_of(key)
        assert (src.kind, src.detail) == ("env", var), key


def test_parsl_chat_env_wins_over_openai_env(tmp_path: Path) -> None:
    settings = load(tmp_path, env={"OPENAI_BASE_URL": "http://openai/v1", "PARSL_CHAT_ENDPOINT": "http://mine/v1"})
    assert settings.run.endpoint == "http://mine/v1"
    assert settings.source_of("endpoint").detail == "PARSL_CHAT_ENDPOINT"


def test_empty_openai_env_ignored(tmp_path: Path) -> None:
    settings = load(tmp_path, config="endpoint: http://yaml/v1\n", env={"OPENAI_BASE_URL": "", "OPENAI_API_KEY": ""})
    assert settings.run.endpoint == "http://yaml/v1"
    assert settings.run.api_key is None
    assert settings.source_of("endpoint").kind == "yaml"


def test_cli_over_env(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        profile="executor: local\nworkers: 3\n",
        env={"PARSL_CHAT_WORKERS": "7", "PARSL_CHAT_ENDPOINT": "http://env/v1", "PARSL_CHAT_MODEL": "env-model"},
        cli={"profile.workers": 9, "endpoint": "http://cli/v1", "agent_count": 4, "model": None, "limits.max_attempts": "2"},
    )
    assert settings.profile.workers == 9
    assert settings.run.endpoint == "http://cli/v1"
    assert settings.run.agent_count == 4
    assert settings.run.model == "env-model"  # None on the command line means "not given"
    assert settings.run.limits.max_attempts == 2
    assert (settings.source_of("profile.workers").kind, settings.source_of("profile.workers").detail) == (
        "cli",
        "profile.workers",
    )
    assert settings.source_of("model").kind == "env"
    assert settings.source_of("limits.max_attempts").kind == "cli"


def test_cli_overrides_yaml_max_failures(tmp_path: Path) -> None:
    settings = load(tmp_path, config="max_failures: 3\n", cli={"max_failures": "5%"})
    assert settings.run.max_failures == "5%"
    assert load(tmp_path, config="max_failures: 3\n").run.max_failures == "3"


def test_cli_only_profile_for_other_executor_is_allowed_from_env(tmp_path: Path) -> None:
    """A site-wide PARSL_CHAT_PARTITION must not break local runs: only YAML is checked for applicability."""
    settings = load(tmp_path, env={"PARSL_CHAT_PARTITION": "debug"})
    assert settings.profile.partition == "debug"


def test_env_not_settings_ignored(tmp_path: Path) -> None:
    load(tmp_path, env={"PARSL_CHAT_PROFILE": "x", "PARSL_CHAT_CONFIG": "y", "PARSL_CHAT_DEBUG": "1"})


def test_unknown_parsl_chat_env_var(tmp_path: Path) -> None:
    msg = error(tmp_path, env={"PARSL_CHAT_WORKRS": "3"})
    assert msg.startswith("environment variable PARSL_CHAT_WORKRS is not a parsl-chat setting; valid names: ")
    names = msg.split("valid names: ")[1].split(", ")
    assert names == sorted(names)
    for expected in (
        "PARSL_CHAT_WORKERS",
        "PARSL_CHAT_LIMITS_TIMEOUT_S",
        "PARSL_CHAT_AGENTS",
        "PARSL_CHAT_ENDPOINT",
        "PARSL_CHAT_PARTITION",
    ):
        assert expected in names
    assert "PARSL_CHAT_NAME" not in names and "PARSL_CHAT_AGENT_COUNT" not in names


def test_env_type_error(tmp_path: Path) -> None:
    msg = error(tmp_path, env={"PARSL_CHAT_WORKERS": "many"})
    assert msg == "environment variable PARSL_CHAT_WORKERS: 'profile.workers' must be a whole number, got 'many'"


@pytest.mark.parametrize(
    ("where", "kw"),
    [
        ("option --endpoint", {"cli": {"endpoint": "localhost:8000/v1"}}),
        ("environment variable OPENAI_BASE_URL", {"env": {"OPENAI_BASE_URL": "localhost:8000/v1"}}),
        ("config.yaml:3", {"config": "agents:\n  - name: a\n    endpoint: localhost:8000/v1\n"}),
    ],
)
def test_endpoint_must_be_an_http_url(tmp_path: Path, where: str, kw: dict[str, Any]) -> None:
    # without a scheme every request would fail one by one; say so once, before anything is sent
    msg = error(tmp_path, **kw)
    assert msg.endswith(f"{where}: endpoint must be an http(s) base URL like http://host:8000/v1, got 'localhost:8000/v1'")


def test_bad_endpoint_message_leaves_credentials_out(tmp_path: Path) -> None:
    msg = error(tmp_path, cli={"endpoint": "user:s3cret@gpu-node:8000/v1"})
    assert "s3cret" not in msg and "'***@gpu-node:8000/v1'" in msg


def test_cli_option_named_as_typed(tmp_path: Path) -> None:
    assert error(tmp_path, cli={"agent_count": 0}).startswith("option --agents: ")
    assert error(tmp_path, cli={"max_failures": "abc"}).startswith("option --max-failures: ")


# --------------------------------------------------------------------------- errors with file:line


def test_unknown_top_level_key(tmp_path: Path) -> None:
    msg = error(tmp_path, config="routing: round_robin\nagentz: []\n")
    assert msg.startswith(f"{tmp_path / 'config.yaml'}:2: unknown key 'agentz' at top level; valid keys: ")
    valid = msg.split("valid keys: ")[1].split(", ")
    assert {"endpoint", "agents", "limits", "server", "routing", "profile"} <= set(valid)


def test_unknown_key_in_limits(tmp_path: Path) -> None:
    msg = error(tmp_path, config="limits:\n  concurrency: 2\n  timeout: 5\n")
    assert msg.startswith(f"{tmp_path / 'config.yaml'}:3: unknown key 'timeout' in 'limits'; valid keys: ")
    assert "timeout_s" in msg and "max_attempts" in msg


def test_unknown_key_in_agent(tmp_path: Path) -> None:
    msg = error(tmp_path, config="agents:\n  - name: a\n    temprature: 1\n")
    assert msg.startswith(f"{tmp_path / 'config.yaml'}:3: unknown key 'temprature' in 'agents'; valid keys: ")
    assert "system_prompt" in msg and "params" in msg


def test_unknown_key_in_profile(tmp_path: Path) -> None:
    msg = error(tmp_path, profile="executor: local\n\nworker: 3\n")
    assert msg.startswith(f"{tmp_path / 'profile.yaml'}:3: unknown key 'worker' in 'profile'; valid keys: ")
    assert "workers" in msg and "walltime" in msg


def test_unknown_key_in_config_profile_section(tmp_path: Path) -> None:
    msg = error(tmp_path, config="profile:\n  nodes: 3\n")
    assert msg.startswith(f"{tmp_path / 'config.yaml'}:2: unknown key 'nodes' in 'profile'")


@pytest.mark.parametrize(
    ("profile", "line", "expected"),
    [
        ("executor: local\nworkers: two\n", 2, "'profile.workers' must be a whole number, got 'two'"),
        ("executor: local\nworkers: 1.5\n", 2, "'profile.workers' must be a whole number, got 1.5"),
        ("executor: local\nworkers: true\n", 2, "'profile.workers' must be a whole number, got True"),
        ("executor: slurm\nexclusive: maybe\n", 2, "'profile.exclusive' must be true or false, got 'maybe'"),
        ("executor: local\nstrategy_period_s: soon\n", 2, "'profile.strategy_period_s' must be a number, got 'soon'"),
        ("executor: local\nworker_init: [a]\n", 2, "'profile.worker_init' must be a string, got ['a']"),
        ("executor: kubernetes\nnode_selector: x\n", 2, "'profile.node_selector' must be a mapping, got 'x'"),
    ],
)
def test_profile_type_errors(tmp_path: Path, profile: str, line: int, expected: str) -> None:
    msg = error(tmp_path, profile=profile)
    assert msg == f"{tmp_path / 'profile.yaml'}:{line}: {expected}"


@pytest.mark.parametrize(
    ("config", "where", "expected"),
    [
        ("limits:\n  timeout_s: soon\n", ":2", "'limits.timeout_s' must be a number, got 'soon'"),
        ("agent_count: lots\n", ":1", "'agent_count' must be a whole number, got 'lots'"),
        ("agents:\n  - name: a\n    weight: heavy\n", ":3", "'agents.weight' must be a number, got 'heavy'"),
        ("agents:\n  - name: a\n    params: [1]\n", ":3", "'agents.params' must be a mapping, got [1]"),
        ("agents:\n  - name: a\n    api_key: 5\n", ":3", "'agents.api_key' must be a string"),
    ],
)
def test_config_type_errors(tmp_path: Path, config: str, where: str, expected: str) -> None:
    msg = error(tmp_path, config=config)
    assert str(tmp_path / "config.yaml") + where in msg
    assert msg.endswith(expected)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("limits: 5\n", ":1: 'limits' must be a mapping; valid keys: concurrency, "),
        ("profile: [1]\n", ":1: 'profile' must be a mapping of profile keys"),
        ("agents: []\n", ":1: 'agents' must be a non-empty list of agents"),
        ("agents: {name: a}\n", ":1: 'agents' must be a non-empty list of agents"),
        ("agents:\n  - just-a-name\n", ":1): agent 1 must be a mapping with at least 'name'"),
        ("agents:\n  - name: a\n  - model: m\n", ":3: agent 2 has no 'name'"),
    ],
)
def test_bad_sections(tmp_path: Path, config: str, expected: str) -> None:
    assert expected in error(tmp_path, config=config)


def test_duplicate_agent_names(tmp_path: Path) -> None:
    msg = error(tmp_path, config="agents:\n  - name: a\n  - name: b\n  - name: a\n    model: m\n")
    assert msg == f"{tmp_path / 'config.yaml'}:4: duplicate agent name 'a'"


@pytest.mark.parametrize(
    ("profile", "key", "executor", "line"),
    [
        ("executor: local\npartition: debug\n", "partition", "slurm", 2),
        ("executor: slurm\n\nnamespace: ns\n", "namespace", "kubernetes", 3),
        ("executor: kubernetes\naccount: proj\n", "account", "slurm", 2),
        ("executor: slurm-allocation\nscheduler_options: '#SBATCH -x'\n", "scheduler_options", "slurm", 2),
    ],
)
def test_key_for_another_executor(tmp_path: Path, profile: str, key: str, executor: str, line: int) -> None:
    msg = error(tmp_path, profile=profile)
    own = profile.split("\n")[0].split(": ")[1]
    assert msg == (
        f"{tmp_path / 'profile.yaml'}:{line}: '{key}' applies only to executor {executor}, but this profile's executor is '{own}'"
    )


def test_key_for_another_executor_from_config_profile_section(tmp_path: Path) -> None:
    msg = error(tmp_path, config="profile:\n  image: x\n")
    assert msg.startswith(f"{tmp_path / 'config.yaml'}:2: 'image' applies only to executor kubernetes")


def test_unknown_executor(tmp_path: Path) -> None:
    msg = error(tmp_path, profile="executor: pbs\n")
    where = f"{tmp_path / 'profile.yaml'}:1"
    assert msg == f"{where}: unknown executor 'pbs'; valid executors: local, slurm, slurm-allocation, kubernetes"


@pytest.mark.parametrize(
    ("profile", "fragment"),
    [
        ("executor: local\nworkers: 0\n", "'workers' must be at least 1"),
        ("executor: slurm\nnodes_per_block: 0\n", "'nodes_per_block' must be at least 1"),
        ("executor: slurm\nmax_blocks: 2\ninit_blocks: 3\n", "init_blocks and min_blocks must not exceed max_blocks"),
        ("executor: slurm\nmax_blocks: 2\nmin_blocks: 3\n", "init_blocks and min_blocks must not exceed max_blocks"),
    ],
)
def test_profile_value_checks(tmp_path: Path, profile: str, fragment: str) -> None:
    assert fragment in error(tmp_path, profile=profile)


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ("routing: random\n", "unknown routing 'random'; valid: round_robin, least_loaded"),
        ("server:\n  kind: docker\n", "unknown server kind 'docker'; valid: embedded, none, command"),
        ("server:\n  kind: command\n", "server kind 'command' needs 'server.command'"),
        ("agent_count: 0\n", "the number of agents must be at least 1"),
        ("limits:\n  concurrency: 0\n", "'limits.concurrency' must be at least 1"),
        ("limits:\n  max_attempts: 0\n", "'limits.max_attempts' must be at least 1"),
        ("agents:\n  - name: a\n    concurrency: 0\n", "agent concurrency must be at least 1"),
        ("agents:\n  - name: a\n    weight: 0\n", "agent weight must be positive"),
        ("max_failures: lots\n", "max_failures must be a count like 10 or a share like 1%, got 'lots'"),
    ],
)
def test_run_value_checks(tmp_path: Path, config: str, fragment: str) -> None:
    msg = error(tmp_path, config=config)
    assert fragment in msg
    assert str(tmp_path / "config.yaml") in msg  # every one names where the value came from


def test_server_command_ok(tmp_path: Path) -> None:
    settings = load(tmp_path, config="server:\n  kind: command\n  command: vllm serve {model} --port {port}\n")
    assert settings.run.server.command == "vllm serve {model} --port {port}"


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    msg = error(tmp_path, config="limits:\n  concurrency: 2\n  timeout_s: [1, 2\nrouting: x\n")
    assert msg.startswith(f"{tmp_path / 'config.yaml'}:")
    line = int(msg.split(":")[1]) if ":" in msg else 0
    assert line in (3, 4)
    assert "invalid YAML" in msg


def test_invalid_yaml_tab_indent(tmp_path: Path) -> None:
    msg = error(tmp_path, profile="executor: local\n\tworkers: 2\n")
    assert msg.startswith(f"{tmp_path / 'profile.yaml'}:2: invalid YAML")


def test_yaml_not_a_mapping(tmp_path: Path) -> None:
    msg = error(tmp_path, config="- a\n- b\n")
    assert msg == f"{tmp_path / 'config.yaml'}:1: expected a mapping of keys to values, got list"


def test_yaml_empty_and_comment_only(tmp_path: Path) -> None:
    assert load(tmp_path, config="# nothing\n").run == RunConfig()
    assert read_yaml(yml(tmp_path, "e.yaml", "")) == {}


def test_yaml_missing_and_not_utf8(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(str(yml(tmp_path, "p.yaml", "executor: local\n")), config_file=tmp_path / "absent.yaml", env={})
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"model: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"not valid UTF-8 \(byte 11\)"):
        read_yaml(bad)


def test_read_yaml_lines(tmp_path: Path) -> None:
    data = read_yaml(yml(tmp_path, "x.yaml", "a: 1\n\nb:\n  c: 2\n"))
    assert data == {"a": 1, "b": {"c": 2}}
    assert data.lines == {"a": 1, "b": 3}
    assert data["b"].lines == {"c": 4}


# --------------------------------------------------------------------------- secrets


def secret_settings(tmp_path: Path) -> Settings:
    return load(
        tmp_path,
        config=f"api_key: {KEY}-yaml\nagents:\n  - name: a\n    api_key: {KEY}-agent\n",
        env={"OPENAI_API_KEY": KEY},
    )


def test_secret_values_kept(tmp_path: Path) -> None:
    settings = secret_settings(tmp_path)
    assert settings.run.api_key is not None and settings.run.api_key.reveal() == KEY  # env over yaml
    agent_key = settings.run.agents[0].api_key
    assert agent_key is not None and agent_key.reveal() == f"{KEY}-agent"
    assert settings.as_dict(redact=False)["api_key"] == KEY


def test_secrets_redacted_everywhere(tmp_path: Path) -> None:
    settings = secret_settings(tmp_path)
    data = settings.as_dict()
    assert data["api_key"] == REDACTED
    assert data["agents"][0]["api_key"] == REDACTED
    dumped = yaml.safe_dump(data)  # what config.yaml gets
    rows = settings.rows()
    texts = [
        dumped,
        repr(data),
        repr(rows),
        repr(settings),
        repr(settings.run),
        repr(settings.run.agents),
        str(settings.run.api_key),
        repr(settings.run.api_key),
        f"{settings.run.api_key}",
    ]
    for text in texts:
        assert "SUPERSECRET" not in text
    assert ("api_key", REDACTED, settings.source_of("api_key")) in rows
    assert ("agents.a.api_key", REDACTED, settings.source_of("agents.a.api_key")) in rows


def test_secret_behaviour() -> None:
    s = Secret(KEY)
    assert repr(s) == str(s) == "Secret('***')"
    assert s == Secret(KEY) and s != Secret("other") and s != KEY
    assert hash(s) == hash(Secret(KEY))
    back = pickle.loads(pickle.dumps(s))
    assert back == s and back.reveal() == KEY


def test_rows(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        profile="executor: local\nworkers: 3\n",
        config="agents:\n  - name: a\n    weight: 2\n",
        env={"PARSL_CHAT_LIMITS_TIMEOUT_S": "5"},
        cli={"agent_count": 2},
    )
    rows = {key: (value, src) for key, value, src in settings.rows()}
    assert rows["profile.workers"][0] == 3 and rows["profile.workers"][1].kind == "yaml"
    assert rows["limits.timeout_s"][0] == 5.0 and rows["limits.timeout_s"][1].kind == "env"
    assert rows["agent_count"][0] == 2 and rows["agent_count"][1].kind == "cli"
    assert rows["agents.a.weight"][0] == 2.0 and rows["agents.a.weight"][1].kind == "yaml"
    assert rows["agents.a.model"][1].kind == "default"
    assert rows["server.kind"] == ("embedded", settings.source_of("server.kind"))
    assert "agents" not in rows and "limits" not in rows and "profile" not in rows
    assert {"cost.su_per_node_hour", "endpoint", "api_key", "profile.executor"} <= set(rows)


def test_as_dict_shape(tmp_path: Path) -> None:
    data = load(tmp_path, config="agents:\n  - name: a\n").as_dict()
    assert data["profile"]["executor"] == "local"
    assert data["limits"]["concurrency"] == 4
    assert data["agents"] == [
        {
            "name": "a",
            "system_prompt": AgentConfig(name="a").system_prompt,
            "model": None,
            "endpoint": None,
            "api_key": None,
            "params": {},
            "weight": 1.0,
            "concurrency": None,
            "schema": None,
        }
    ]
    yaml.safe_dump(data)  # plain data only


# --------------------------------------------------------------------------- profiles


def test_find_profile_by_name_and_path(tmp_path: Path) -> None:
    assert find_profile("local") == shipped_configs_dir() / "local.yaml"
    assert find_profile("slurm") == shipped_configs_dir() / "slurm.yaml"
    path = yml(tmp_path, "mine.yml", "executor: local\n")
    assert find_profile(str(path)) == path
    sub = tmp_path / "d"
    sub.mkdir()
    noext = sub / "prof"
    noext.write_text("executor: local\n")
    assert find_profile(str(noext)) == noext  # a path separator makes it a path


def test_find_profile_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        find_profile(str(tmp_path / "absent.yaml"))


def test_find_profile_unknown_name_lists_available() -> None:
    with pytest.raises(ConfigError) as info:
        find_profile("nosuch")
    msg = str(info.value)
    assert msg.startswith("unknown profile 'nosuch'; available profiles: ")
    names = msg.split(": ", 1)[1].split(", ")
    assert {"local", "slurm", "slurm-allocation", "kubernetes"} <= set(names)
    assert "agents" not in names  # agents.yaml is a config, not a profile
    assert info.value.hint is not None and "parsl-chat profiles" in info.value.hint


def test_user_profiles_shadow_shipped(no_user_profiles: Path) -> None:
    no_user_profiles.mkdir(parents=True)
    (no_user_profiles / "local.yaml").write_text("executor: local\nworkers: 5\n")
    (no_user_profiles / "mine.yaml").write_text("executor: slurm\n")
    (no_user_profiles / "notaprofile.yaml").write_text("agents: []\n")
    (no_user_profiles / "broken.yaml").write_text("executor: [\n")
    profiles = {name: (path, kind) for name, path, kind in list_profiles()}
    assert profiles["local"] == (no_user_profiles / "local.yaml", "user")
    assert profiles["mine"] == (no_user_profiles / "mine.yaml", "user")
    assert profiles["slurm"][1] == "shipped"
    assert "notaprofile" not in profiles and "broken" not in profiles
    assert find_profile("local") == no_user_profiles / "local.yaml"
    assert load_settings("local", env={}).profile.workers == 5


def test_load_settings_unknown_profile_name() -> None:
    with pytest.raises(ConfigError, match="unknown profile 'gpu-cluster'"):
        load_settings("gpu-cluster", env={})


# --------------------------------------------------------------------------- max failures


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("0", (0, None)),
        ("10", (10, None)),
        (" 3 ", (3, None)),
        ("1%", (None, 0.01)),
        ("0%", (None, 0.0)),
        ("100%", (None, 1.0)),
        ("2.5%", (None, 0.025)),
    ],
)
def test_parse_max_failures(spec: str, expected: tuple[int | None, float | None]) -> None:
    assert parse_max_failures(spec) == expected


@pytest.mark.parametrize("spec", ["-1", "1.5", "abc", "", "%", "101%", "-1%", "nan%", "5 %x"])
def test_parse_max_failures_rejects(spec: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_max_failures(spec)
    assert str(info.value) == f"--max-failures: max_failures must be a count like 10 or a share like 1%, got {spec!r}"


def test_parse_max_failures_where() -> None:
    with pytest.raises(ConfigError, match=r"^cfg.yaml:3: "):
        parse_max_failures("x", "cfg.yaml:3")


# --------------------------------------------------------------------------- structured output

LABEL_SCHEMA = '{"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}'


def test_schema_files_are_relative_to_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "label.json").write_text(LABEL_SCHEMA)
    (tmp_path / "schemas" / "other.json").write_text(LABEL_SCHEMA)
    monkeypatch.chdir(tmp_path / "schemas")  # not where the config is
    settings = load(
        tmp_path,
        config="schema: schemas/label.json\nagents:\n  - name: a\n  - name: b\n    schema: schemas/other.json\n",
    )
    assert settings.run.schema == str(tmp_path / "schemas" / "label.json")
    assert settings.run.agents[1].schema == str(tmp_path / "schemas" / "other.json")
    assert settings.source_of("schema").kind == "yaml"
    from_cli = load(tmp_path, cli={"schema": "label.json"})  # an option: relative to the working directory
    assert from_cli.run.schema == str(tmp_path / "schemas" / "label.json")


def test_missing_or_bad_schema_file_names_the_config_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config\.yaml:2: schema file .*nope\.json does not exist"):
        load(tmp_path, config="routing: round_robin\nschema: nope.json\n")
    (tmp_path / "bad.json").write_text('{"type": "object",\n "required": "label"}')
    with pytest.raises(ConfigError, match=r"bad\.json: 'json_schema.schema': not a valid JSON Schema.*named by .*config\.yaml:3"):
        load(tmp_path, config="agents:\n  - name: a\n    schema: bad.json\n")


def test_server_threads_are_settings_with_sources(tmp_path: Path) -> None:
    settings = load(tmp_path, config="server: {threads: 2}\n", env={"PARSL_CHAT_SERVER_BATCH_THREADS": "1"})
    assert (settings.run.server.threads, settings.run.server.batch_threads) == (2, 1)
    assert settings.source_of("server.batch_threads").kind == "env"
    with pytest.raises(ConfigError, match=r"config\.yaml:1: 'server.threads' must be 0 \(from the cores\) or more"):
        load(tmp_path, config="server: {threads: -1}\n")


def test_structured_settings_checked(tmp_path: Path) -> None:
    (tmp_path / "label.json").write_text(LABEL_SCHEMA)
    with pytest.raises(ConfigError, match=r"config\.yaml:3: agent 'a' has both 'schema' and 'params.response_format'"):
        load(tmp_path, config="agents:\n  - name: a\n    schema: label.json\n    params: {response_format: {type: text}}\n")
    with pytest.raises(ConfigError, match=r"config\.yaml:3: 'params.response_format' of agent 'a': 'type' must be"):
        load(tmp_path, config="agents:\n  - name: a\n    params: {response_format: {type: xml}}\n")
    with pytest.raises(ConfigError, match=r"config\.yaml:1: 'limits.max_invalid_retries' must be 0 or more"):
        load(tmp_path, config="limits: {max_invalid_retries: -1}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'flaten' in 'output'; valid keys: flatten, errors_in_output"):
        load(tmp_path, config="output: {flaten: true}\n")


def test_output_and_retries_from_every_layer(tmp_path: Path) -> None:
    settings = load(tmp_path, config="output: {flatten: true}\n", env={"PARSL_CHAT_LIMITS_MAX_INVALID_RETRIES": "5"})
    assert settings.run.output.flatten is True and settings.run.output.errors_in_output is False
    assert settings.run.limits.max_invalid_retries == 5
    assert load(tmp_path).run.limits.max_invalid_retries == 2
    settings = load(tmp_path, config="output: {flatten: true}\n", cli={"output.flatten": False})
    assert settings.run.output.flatten is False and settings.source_of("output.flatten").kind == "cli"


def test_agents_get_the_schema_as_response_format(tmp_path: Path) -> None:
    from parsl_chat.core.agents import resolve_agents

    (tmp_path / "label.json").write_text(LABEL_SCHEMA)
    (tmp_path / "own.json").write_text('{"name": "own", "schema": {"type": "object"}, "strict": true}')
    settings = load(
        tmp_path,
        config=(
            "schema: label.json\nagents:\n  - name: a\n  - name: b\n    schema: own.json\n"
            "  - name: c\n    params: {response_format: {type: json_object}}\n"
        ),
    )
    a, b, c = resolve_agents(settings, "http://h:1/v1", "m", None)
    assert a.params["response_format"]["json_schema"]["name"] == "label"
    assert b.params["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "own", "schema": {"type": "object"}, "strict": True},
    }
    assert c.params["response_format"] == {"type": "json_object"}
