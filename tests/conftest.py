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


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_world_config):
    """SFT and reward models on the tiny world, shared by every test that needs them (each copies the folder:
    ``helpers.copy_run``)."""
    from pmrlhf.stages import reward, sft

    run = tmp_path_factory.mktemp("trained")
    sft.run(sft.SFTConfig(run_dir=str(run), world=tiny_world_config))
    reward.run(reward.RewardConfig(run_dir=str(run), world=tiny_world_config))
    return run
