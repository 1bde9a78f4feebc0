"""Reference preprocessing: every Pillow mode the pipeline promises, EXIF orientation, crop, masks."""
import numpy as np
import pytest
from PIL import Image

from jedi_jax.sampling.images import ImageInputError, labeled_grid, load_reference


def _save(tmp_path, image, name, **kw):
    path = tmp_path / name
    image.save(path, **kw)
    return path


def test_modes_become_rgb(tmp_path):
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, 10:, 3] = 255  # left half transparent -> white, right half opaque red
    out = load_reference(_save(tmp_path, Image.fromarray(rgba, "RGBA"), "a.png"), 20)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    assert (out[:, :8] >= 250).all() and (out[:, 12:, 0] >= 250).all() and (out[:, 12:, 1] <= 5).all()
    grey = load_reference(_save(tmp_path, Image.fromarray(np.full((8, 8), 100, np.uint8), "L"), "l.png"), 8)
    assert (grey == 100).all()
    pal = Image.fromarray(np.full((8, 8, 3), (0, 0, 255), np.uint8)).convert("P")
    assert (load_reference(_save(tmp_path, pal, "p.png"), 8) == (0, 0, 255)).all()
    sixteen = Image.fromarray(np.full((8, 8), 65535 // 2, np.uint16))  # mode I;16
    out16 = load_reference(_save(tmp_path, sixteen, "i16.png"), 8)
    assert np.abs(out16.astype(int) - 128).max() <= 1


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((10, 20, 3), np.uint8)
    a[:, :10] = 255  # left half white in the stored pixels
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(tmp_path, img, "r.jpg", exif=exif, quality=100)
    out = load_reference(path, 10)
    # Displayed upright the image is 10 wide, 20 tall: its top half is white; the center crop of the
    # square keeps rows 5..15, so the top of the crop is white and the bottom dark.
    assert out[:3].mean() > 200 and out[-3:].mean() < 50


def test_center_crop_resize_and_mask(tmp_path):
    a = np.zeros((30, 60, 3), np.uint8)
    a[:, 15:45] = (0, 255, 0)  # the center square is green, the sides black
    out = load_reference(a, 16)
    assert out.shape == (16, 16, 3) and (out[..., 1] >= 250).all()
    mask = np.zeros((30, 60), np.uint8)
    mask[:, 30:] = 255  # keep the right half of the crop only
    masked = load_reference(a, 16, mask=mask)
    assert (masked[:, :6] >= 250).all() and (masked[:, 10:, 0] <= 5).all()


def test_mask_must_share_its_references_frame(tmp_path):
    """Image and mask are centre-cropped apart, so a mask of another aspect ratio would cover the wrong
    region: refused in one line. A mask of the same frame at another resolution is fine."""
    a = np.zeros((30, 60, 3), np.uint8)
    with pytest.raises(ImageInputError, match="mask is 30x30 but its reference is 60x30"):
        load_reference(a, 16, mask=np.full((30, 30), 255, np.uint8))
    assert (load_reference(a, 16, mask=np.full((15, 30), 255, np.uint8)) == 0).all()


def test_array_shapes(tmp_path):
    grey = np.full((8, 8, 1), 0.5, np.float32)
    assert (load_reference(grey, 8) == 128).all()  # (H, W, 1) reads as grey
    with pytest.raises(ImageInputError, match=r"got \(8, 8, 2\)"):
        load_reference(np.zeros((8, 8, 2), np.uint8), 8)
    with pytest.raises(ImageInputError, match="image array"):
        load_reference(np.zeros((2, 8, 8, 3), np.uint8), 8)


def test_integer_arrays_other_than_uint8_are_refused():
    """np.array of Python ints is int64: read as floats in [0, 1] it would become a white reference."""
    from jedi_jax.sampling.images import open_image

    values = (np.arange(48).reshape(4, 4, 3) * 5)  # 0..235
    for dtype in (np.int64, np.int32, np.uint16, np.int16):
        with pytest.raises(ImageInputError, match=f"integer image arrays must be uint8, got {np.dtype(dtype).name}"):
            open_image(values.astype(dtype))
    np.testing.assert_array_equal(np.asarray(open_image(values.astype(np.uint8))), values)
    np.testing.assert_array_equal(np.asarray(open_image(values / 255.0)), values)  # floats in [0, 1]


def test_bad_files(tmp_path):
    (tmp_path / "x.png").write_text("no")
    with pytest.raises(ImageInputError, match="not a readable image"):
        load_reference(tmp_path / "x.png", 8)
    with pytest.raises(ImageInputError, match="does not exist"):
        load_reference(tmp_path / "nope.png", 8)
    with pytest.raises(ImageInputError, match="cannot use"):
        load_reference(3.5, 8)


def test_grid_layout():
    rows = [[np.zeros((8, 8, 3), np.uint8)] * 3, [np.full((8, 8, 3), 255, np.uint8)] * 2]
    grid = labeled_grid(rows, [["a"] * 3, ["a long prompt that wraps"] * 2], cell=32)
    assert grid.size[0] == 3 * 36 + 4 and grid.size[1] > 2 * 36
