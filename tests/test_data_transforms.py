"""Batch augmentation (reproducible, a crop of the padded image, flipped or not) and normalisation."""

import pytest
import torch
from PIL import Image

from l2t_dist.data import RandomCropFlip, eval_224_transform, normalize, train_224_transform


def batch(b=16, h=32, w=32):
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def test_reproducible_from_the_generator_only():
    x, aug = batch(), RandomCropFlip(pad=4)
    torch.manual_seed(123)  # the global RNG must not matter
    a = aug(x, torch.Generator().manual_seed(7))
    torch.manual_seed(456)
    b = aug(x, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == x.shape
    assert not torch.equal(a, aug(x, torch.Generator().manual_seed(8)))


def test_each_sample_is_a_crop_of_the_padded_image_maybe_flipped():
    x = batch(b=64, h=12, w=10)
    out = RandomCropFlip(pad=4)(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    seen = set()
    for i in range(len(x)):
        hits = [(oy, ox, f) for oy in range(9) for ox in range(9) for f in (0, 1)
                if torch.equal(out[i], (lambda c: c.flip(-1) if f else c)(padded[i, :, oy:oy + 12, ox:ox + 10]))]
        assert hits, f"sample {i} is not a crop of its padded image"
        seen.update(hits)
    assert {f for *_, f in seen} == {0, 1} and len({(oy, ox) for oy, ox, _ in seen}) > 20


def test_pad_zero_without_flip_is_identity():
    x = batch()
    assert torch.equal(RandomCropFlip(pad=0, flip=False)(x, torch.Generator().manual_seed(0)), x)


def test_normalize_matches_torchvision():
    from torchvision.transforms import functional as TF

    x = batch(b=2)
    y = normalize(x)
    assert y.dtype == torch.float32
    ref = TF.normalize(x.float() / 255, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    torch.testing.assert_close(y, ref)
    zero = normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8)).flatten()
    torch.testing.assert_close(zero, torch.tensor([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225]))
    with pytest.raises(ValueError, match="uint8"):
        normalize(x.float())


def test_224_transforms_shapes():
    img = Image.new("RGB", (300, 260), (10, 200, 30))
    torch.manual_seed(0)
    for tf in (train_224_transform(), eval_224_transform()):
        out = tf(img)
        assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    torch.testing.assert_close(eval_224_transform()(img)[:, 100, 100],
                               torch.tensor([(10 / 255 - 0.485) / 0.229, (200 / 255 - 0.456) / 0.224,
                                             (30 / 255 - 0.406) / 0.225]))
