"""The training augmentations of ``edgeloop train``: flips and crops (``--flip-crop``)."""

from __future__ import annotations

import numpy as np

from edgeloop.pipeline import random_flip_crop


def test_every_image_is_a_crop_of_its_padded_self_or_its_mirror() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((24, 3, 8, 8), dtype=np.float32)
    out = random_flip_crop(x, np.random.default_rng(1))
    assert out.shape == x.shape and out.dtype == np.float32
    flips = 0
    for image, source in zip(out, x, strict=True):
        matches = [(flip, dy, dx) for flip in (False, True) for dy in range(9) for dx in range(9)
                   if np.array_equal(image, np.pad(source[..., ::-1] if flip else source,
                                                   ((0, 0), (4, 4), (4, 4)))[:, dy : dy + 8, dx : dx + 8])]
        assert matches, "an output image is neither a crop of the padded image nor of its mirror"
        flips += all(flip for flip, _, _ in matches)
    assert 4 <= flips <= 20  # about half are mirrored
    np.testing.assert_array_equal(random_flip_crop(x, np.random.default_rng(1)), out)  # seeded
