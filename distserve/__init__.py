"""distserve: disaggregated prefill/decode LLM serving as independent gRPC services."""

__all__ = ["AsyncClient", "Client", "Completion"]


def __getattr__(name: str):
    # Lazy, so `import distserve.engine` pulls in no gRPC.
    if name in __all__:
        from distserve import client

        return getattr(client, name)
    raise AttributeError(name)
