import pytest

from pmrlhf.data.world import WorldConfig


@pytest.fixture(scope="session")
def tiny_world_config():
    """A world small enough for end-to-end tests: 6 prompts, 3 responses each."""
    return WorldConfig(
        n_prompts=6,
        responses_per_prompt=3,
        max_words=4,
        vocab_words=12,
        n_demonstrations=600,
        n_comparisons=1200,
        n_rankings=300,
        ranking_k=3,
    )
