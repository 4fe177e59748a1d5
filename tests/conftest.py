import pytest


@pytest.fixture(scope="session")
def tiny():
    """The seeded tiny Llama, loaded once per test session."""
    from distserve.engine.models import load_model

    return load_model("tiny-llama", device="cpu")
