"""Settings: flags, then PERFAGENT_* environment, then the YAML file, then defaults; bad values stop
start-up naming the setting; every setting is documented in the README."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from perfagent import __version__
from perfagent.errors import ConfigError
from perfagent.settings import Settings, load_settings

README = Path(__file__).parent.parent / "README.md"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("PERFAGENT_"):
            monkeypatch.delenv(name)


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "perfagent.yaml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    settings = load_settings()
    assert (settings.host, settings.port, settings.polling_interval) == ("127.0.0.1", 8002, 30.0)
    assert settings.allowed_targets == ["127.0.0.0/8", "::1/128", "localhost"]
    assert not settings.dev


def test_precedence_flag_over_env_over_file_over_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _config(tmp_path, "port: 9001\npolling_interval: 7\nagent_id: from-file\n")
    assert load_settings(config_file=path).port == 9001
    monkeypatch.setenv("PERFAGENT_PORT", "9002")
    settings = load_settings(config_file=path)
    assert settings.port == 9002  # env beats file
    assert settings.polling_interval == 7  # file beats default
    assert load_settings(config_file=path, port=9003).port == 9003  # flag beats env
    monkeypatch.setenv("PERFAGENT_CONFIG_FILE", str(path))
    assert load_settings().agent_id == "from-file"  # the file can be named by the environment too


def test_config_file_lists_instances(tmp_path: Path) -> None:
    path = _config(
        tmp_path,
        """
instances:
  - id: vllm-a
    engine: vllm
    metrics_url: http://10.1.2.3:8000/metrics
    dcgm_url: http://10.1.2.3:9400/metrics
    gpu_selector: {gpu: "0"}
    labels: {model: llama-3.1-8b, deployment_group: chat}
  - id: tgi-a
    engine: tgi
    metrics_url: http://10.1.2.4:9000/metrics
""",
    )
    settings = load_settings(config_file=path)
    assert [(i.id, i.engine.value) for i in settings.instances] == [("vllm-a", "vllm"), ("tgi-a", "tgi")]
    assert settings.instances[0].labels["deployment_group"] == "chat"
    assert settings.instances[0].gpu_selector == {"gpu": "0"}


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("port: eighty\n", "port"),
        ("polling_interval: -1\n", "polling_interval"),
        ("log_format: xml\n", "log_format"),
        ("allowed_targets: ['10.0.0.0/33']\n", "allowed_targets"),
        ("no_such_setting: 1\n", "no_such_setting"),
        ("instances: [{id: a, engine: triton, metrics_url: 'http://h/m'}]\n", "instances.0.engine"),
        ("instances: [{id: a, engine: vllm, metrics_url: 'nope'}]\n", "instances.0.metrics_url"),
        (
            "instances: [{id: a, engine: vllm, metrics_url: 'http://h/m'}, {id: a, engine: tgi, metrics_url: 'http://h/n'}]\n",
            "listed twice",
        ),
    ],
)
def test_bad_value_names_the_setting(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_settings(config_file=_config(tmp_path, text))


def test_bad_env_value_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERFAGENT_SCRAPE_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="scrape_timeout"):
        load_settings()


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = _config(tmp_path, "port: 1\ninstances: [\n  - {id: a\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))} line \d+: invalid YAML"):
        load_settings(config_file=path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no-such\.yaml"):
        load_settings(config_file=tmp_path / "no-such.yaml")


def test_every_setting_is_documented_in_the_readme() -> None:
    readme = README.read_text()
    table = readme[readme.index("## Settings") :]
    for name in Settings.model_fields:
        assert re.search(rf"^\| `{name}` \|", table, re.M), f"setting {name} missing from README's table"
        assert f"PERFAGENT_{name.upper()}" in table, f"env var of {name} missing from README"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "perfagent", *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_cli_version() -> None:
    result = _cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"perfagent {__version__}"


def test_cli_stops_on_a_bad_setting(tmp_path: Path) -> None:
    config = _config(tmp_path, "polling_interval: never\n")
    result = _cli("serve", "--config", str(config), "--db", str(tmp_path / "x.duckdb"))
    assert result.returncode == 2
    assert "polling_interval" in result.stderr


def test_cli_stops_on_a_target_outside_allowed_targets(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        "allowed_targets: ['10.0.0.0/8']\ninstances: [{id: far, engine: vllm, metrics_url: 'http://192.0.2.7/metrics'}]\n",
    )
    result = _cli("serve", "--config", str(config), "--db", str(tmp_path / "x.duckdb"))
    assert result.returncode == 2
    assert "far" in result.stderr and "allowed_targets" in result.stderr


def test_every_catalog_quantity_is_documented_in_the_readme() -> None:
    from perfagent.catalog import QUANTITIES

    readme = README.read_text()
    section = readme[readme.index("## Normalized quantities") : readme.index("## Engines and versions")]
    for quantity in QUANTITIES:
        assert re.search(rf"^\| `{quantity.name}` \| {quantity.unit.value} \|", section, re.M), quantity.name


BAD_RULE = """groups:
  - name: x
    rules:
      - name: TooFast
        type: HIGH_LATENCY
        quantity: ttft_secs
        op: ">"
        thresholds: {LOW: 1}
        recommendation: none
"""


def test_cli_rules_check_and_a_bad_rule_stops_start_up(tmp_path: Path) -> None:
    good = _cli("rules", "check", str(Path(__file__).parent.parent / "rules"))
    assert good.returncode == 0, good.stdout + good.stderr
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "bad.yaml").write_text(BAD_RULE)
    checked = _cli("rules", "check", str(rules))
    assert checked.returncode != 0
    assert f"{rules / 'bad.yaml'}:6: rule 'TooFast'" in checked.stdout + checked.stderr
    served = _cli("serve", "--rules", str(rules), "--db", str(tmp_path / "x.duckdb"))
    assert served.returncode == 2
    assert "ttft_secs" in served.stderr and "bad.yaml:6" in served.stderr
