"""The private APIs the pipeline keeps (each justified by bench/results/private_apis.json): a test
that names what broke the day a library drops one, instead of a wrong result or a deep traceback."""

import torch
from torchvision import transforms as T

from pipeline.data.images import decode_tensor
from pipeline.data.noise import _RandAugment


def test_torchvisions_decode_op_is_still_there_and_decodes():
    assert hasattr(torch.ops.image, "decode_image"), (
        "torch.ops.image.decode_image is gone: images.decode_tensor must call torchvision.io.decode_image")
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (5, 3), (10, 20, 30)).save(buf, format="PNG")
    t = decode_tensor(buf.getvalue(), "RGB")
    assert t is not None and t.shape == (3, 3, 5) and t[:, 0, 0].tolist() == [10, 20, 30]


def test_randaugments_magnitude_table_is_still_a_method_we_can_cache():
    assert callable(getattr(T.RandAugment, "_augmentation_space", None)), (
        "T.RandAugment._augmentation_space is gone: noise._RandAugment must become plain T.RandAugment")
    ra = _RandAugment(num_ops=2, magnitude=9, num_magnitude_bins=31)
    space = ra._augmentation_space(31, [32, 32])
    assert ra._augmentation_space(31, [32, 32]) is space  # cached: the same table, not a new one
    assert set(space) == set(T.RandAugment()._augmentation_space(31, [32, 32]))
