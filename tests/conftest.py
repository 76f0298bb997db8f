import pytest


@pytest.fixture(scope="session")
def tiny_world_config():
    """The quick demo's world: 6 prompts, 3 responses each, small enough for end-to-end tests."""
    from pmrlhf.stages.pipeline import demo_config

    return demo_config(quick=True).world
