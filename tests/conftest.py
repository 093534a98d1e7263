"""Shared fixtures: tiny models built in milliseconds on the CPU, and generated galleries.

Fast tests never download anything: HF_HUB_OFFLINE is forced so a test that would reach the hub fails
at once instead of retrying for a minute.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


import pytest

from tests.tiny import register_tiny_arch, tiny_clip, tiny_diffusion, write_gallery


# ----- the tiny models (tests/tiny.py builds them; a test that changes its model builds its own there)
@pytest.fixture(scope="session")
def tiny_encoder():
    """The `tiny-random` CLIP (real tokenizer, 49408-row vocabulary, width 32) on the CPU in fp32."""
    return tiny_clip()


@pytest.fixture(scope="session")
def tiny_arch(tmp_path_factory):
    """The name of an open_clip architecture with the tiny-random CLIP's config (for `ARCH/PATH` specs)."""
    return register_tiny_arch(tmp_path_factory.mktemp("open_clip_configs"))


@pytest.fixture(scope="module")
def tiny():
    """The `tiny-random` diffusion backbone with its tiny-random CLIP (`.clip`) on the CPU in fp32: the whole
    tiny stack, one per test module."""
    return tiny_diffusion()


# ----- generated galleries
@pytest.fixture
def gallery(tmp_path):
    root = tmp_path / "gallery"
    root.mkdir()
    write_gallery(root, 24)
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module: the tiny models run faster so, and much faster on cores shared with
    other jobs. Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
