"""Test-wide settings: one intra-op thread per worker (tiny models are slower with more on 2 cores)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)


from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def _tiny_teacher(folder: Path, kind: str) -> Path:
    """A random 1-channel 8x8 class-conditional teacher folder of ``kind`` (digits shapes, tiny widths)."""
    from stepdistill.data.digits_models import teacher_unet
    from stepdistill.trainers.digits_world import save_teacher

    torch.manual_seed(0)
    unet = teacher_unet(
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    with torch.no_grad():  # diffusers zero-initialises the output conv; break it so gradients flow
        for p in unet.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return save_teacher(unet, folder, {"guidance_scale": 2.0}, kind=kind)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> Path:
    """A random 1-channel 8x8 class-conditional v-prediction teacher folder (digits shapes, tiny widths)."""
    return _tiny_teacher(tmp_path_factory.mktemp("teacher") / "teacher", "vp")


@pytest.fixture(scope="module")
def tiny_flow_teacher(tmp_path_factory) -> Path:
    """The same network as ``tiny_teacher`` as a rectified-flow teacher (``FlowMatchEulerDiscreteScheduler``)."""
    return _tiny_teacher(tmp_path_factory.mktemp("teacher_flow") / "teacher_flow", "flow")
