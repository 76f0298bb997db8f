import os

import pytest
import torch

from pmrlhf.data.world import WorldConfig


def pytest_configure(config):
    """Every test process runs on one thread, and so does every process it starts: the numbers the suite pins
    (the order of float sums follows the thread count) are the same on any machine, and the workers of ``make
    test`` (pytest-xdist, one per core) do not spin against each other. A test that wants more sets them."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


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


# the modules that take longest, first: pytest-xdist hands out whole files in the order collected, and one of
# these started last would keep a worker busy while the other waits
SLOWEST = ("test_own_data", "test_realtext", "test_ppo", "test_guards", "test_optimal", "test_evaluation")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(SLOWEST)))
