"""Print the configuration table of docs/configuration.md from the services' config models (one source of truth)."""

from cache_store.config import StoreConfig
from decode_service.config import DecodeConfig
from gateway.config import GatewayConfig
from kvcluster.config import env_name, flag_name
from kvcluster.rpc.security import SecuritySettings
from prefill_service.config import PrefillConfig

SHARED = frozenset(SecuritySettings.model_fields)


def rows(config_cls, skip=frozenset()) -> list[str]:
    return [f"| `{flag_name(name)}` | `{env_name(name)}` | `{field.default!r}` | {field.description} |"
            for name, field in config_cls.model_fields.items() if name not in skip]


def main() -> None:
    header = ["| flag | env | default | meaning |", "|---|---|---|---|"]
    for title, cls, skip in (("gateway (OpenAI-compatible HTTP API)", GatewayConfig, SHARED),
                             ("decode_service (public Generate)", DecodeConfig, SHARED),
                             ("prefill_service", PrefillConfig, SHARED), ("cache_store", StoreConfig, SHARED),
                             ("every service: TLS and tokens", SecuritySettings, frozenset())):
        print(f"\n**{title}**\n")
        print("\n".join(header + rows(cls, skip)))


if __name__ == "__main__":
    main()
