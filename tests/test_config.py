"""kvcluster.config: one settings model gives env variables, flags and help; flags beat env beat defaults."""

import pytest
import torch
from pydantic import ValidationError

from cache_store.__main__ import main as cache_store_main
from cache_store.config import StoreConfig
from kvcluster.config import ServiceConfig, setting
from kvcluster.errors import InvalidArgument


class DemoConfig(ServiceConfig):
    """A config with one field of every supported type."""

    redis_url: str = setting("redis://x:1/0", "where the index lives")
    port: int = setting(50053, "gRPC port")
    heartbeat_seconds: float = setting(2.0, "heartbeat period")
    verbose: bool = setting(False, "log more")


def test_defaults_then_env_then_flags():
    env = {"KVC_REDIS_URL": "redis://env:2/0", "KVC_PORT": "7", "KVC_VERBOSE": "yes"}
    assert DemoConfig.parse([], environ={}) == DemoConfig()
    from_env = DemoConfig.parse([], environ=env)
    assert (from_env.redis_url, from_env.port, from_env.verbose) == ("redis://env:2/0", 7, True)
    flagged = DemoConfig.parse(["--port", "9", "--no-verbose", "--heartbeat-seconds", "0.5"], environ=env)
    assert (flagged.redis_url, flagged.port, flagged.verbose, flagged.heartbeat_seconds) == \
        ("redis://env:2/0", 9, False, 0.5)


def test_from_env_alone_and_with_overrides():
    config = DemoConfig.from_env({"KVC_HEARTBEAT_SECONDS": "0.25"}, port=1)
    assert (config.heartbeat_seconds, config.port) == (0.25, 1)
    with pytest.raises(ValidationError, match="frozen"):
        config.port = 2


@pytest.mark.parametrize("name, value", [("KVC_PORT", "many"), ("KVC_VERBOSE", "perhaps")])
def test_a_bad_env_value_names_the_variable(name, value):
    with pytest.raises(InvalidArgument, match=name):
        DemoConfig.from_env({name: value})


def test_a_bad_flag_value_names_the_flag():
    with pytest.raises(InvalidArgument, match="--port.*'many'"):
        DemoConfig.parse(["--port", "many"], environ={})


def test_direct_construction_reads_no_environment(monkeypatch):
    monkeypatch.setenv("KVC_PORT", "7")
    assert DemoConfig().port == 50053 and DemoConfig.from_env().port == 7


def test_a_setting_can_come_from_a_file_as_mounted_secrets_do(tmp_path):
    secret = tmp_path / "redis_url"
    secret.write_text("redis://from-file:3/0\n")
    assert DemoConfig.from_env({"KVC_REDIS_URL_FILE": str(secret)}).redis_url == "redis://from-file:3/0"
    both = {"KVC_REDIS_URL_FILE": str(secret), "KVC_REDIS_URL": "redis://env:2/0"}
    assert DemoConfig.from_env(both).redis_url == "redis://env:2/0"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(InvalidArgument, match="KVC_REDIS_URL_FILE.*empty"):
        DemoConfig.from_env({"KVC_REDIS_URL_FILE": str(tmp_path / "empty")})
    with pytest.raises(InvalidArgument, match="KVC_PORT_FILE.*cannot read"):
        DemoConfig.from_env({"KVC_PORT_FILE": str(tmp_path / "missing")})


def test_help_lists_every_field_with_its_env_variable_and_default(capsys):
    with pytest.raises(SystemExit) as exited:
        DemoConfig.parse(["--help"], environ={})
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for flag, env in (("--redis-url", "KVC_REDIS_URL"), ("--port", "KVC_PORT"),
                      ("--heartbeat-seconds", "KVC_HEARTBEAT_SECONDS"), ("--verbose", "KVC_VERBOSE")):
        assert flag in text and env in text
    assert "where the index lives" in text and "50053" in text and "--no-verbose" in text


def test_cache_store_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exited:
        cache_store_main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--host", "--port", "--metrics-port", "--capacity-bytes", "--device", "--redis-url",
                 "--store-id", "--advertise-address", "--heartbeat-seconds", "--lease-seconds",
                 "--num-layers", "--block-size", "--num-kv-heads", "--head-dim", "--dtype", "--fingerprint"):
        assert flag in text, flag


def test_store_config_validates_and_defaults_to_the_smollm2_layout():
    config = StoreConfig()
    assert config.layout(torch.device("cpu")).block_nbytes in (737_280, 368_640) and config.port == 50053 and config.metrics_port == 9103
    assert config.ttl_seconds == 3 * config.heartbeat_seconds
    assert config.identity(1234)[1] == "127.0.0.1:1234"
    for bad in (dict(dtype="int8"), dict(block_size=0), dict(fingerprint="zz"), dict(fingerprint="ab"),
                dict(cuda_memory_fraction=0.0), dict(stream_idle_seconds=0.0), dict(port="many")):
        with pytest.raises(InvalidArgument, match=next(iter(bad))):
            StoreConfig(**bad)


def test_the_step_token_budget_reaches_both_workers_engines_and_must_be_positive():
    from decode_service.config import DecodeConfig
    from prefill_service.config import PrefillConfig

    for config_type in (DecodeConfig, PrefillConfig):
        assert config_type.from_env({"KVC_CHUNK_TOKENS": "128"}).engine_config().max_prefill_tokens == 128
        with pytest.raises(InvalidArgument, match="KVC_CHUNK_TOKENS.*greater than or equal to 1"):
            config_type.from_env({"KVC_CHUNK_TOKENS": "0"})
