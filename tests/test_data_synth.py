"""Synthetic BraTS-like generator: determinism, label content, layout and geometry."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from kanseg.data import DataConfig, build_transforms, load_cases
from kanseg.commands.data import main as data_main
from kanseg.data.synth import synth_case
from kanseg.schema import from_dict


def test_same_seed_same_case_different_seed_different():
    a_img, a_lab, a_aff = synth_case(24, seed=4)
    b_img, b_lab, b_aff = synth_case(24, seed=4)
    c_img, c_lab, _ = synth_case(24, seed=5)
    assert all(np.array_equal(a_img[k], b_img[k]) for k in a_img)
    assert np.array_equal(a_lab, b_lab) and np.array_equal(a_aff, b_aff)
    assert not np.array_equal(a_lab, c_lab)
    assert not np.array_equal(a_img["t1"], c_img["t1"])


@pytest.mark.parametrize("layout,et,mods", [("brats2021", 4, ["t1", "t1ce", "t2", "flair"]),
                                            ("brats2023", 3, ["t1n", "t1c", "t2w", "t2f"])])
def test_label_content_and_tumour_structure(layout, et, mods):
    for seed in range(3):
        images, label, affine = synth_case(32, seed=seed, layout=layout)
        assert list(images) == mods and label.dtype == np.uint8
        assert all(v.dtype == np.float32 and v.shape == (32,) * 3 for v in images.values())
        assert set(np.unique(label)) == {0, 1, 2, et}
        # nesting: the enhancing rim encloses the necrotic core, edema surrounds both
        ncr = np.argwhere(label == 1).mean(0)
        assert label[tuple(np.round(ncr).astype(int))] in (1, et)
        assert (label == 2).sum() > (label == et).sum() > 0
        # tumour lies inside the head (non-zero image); edema is bright in T2 and FLAIR
        head = images[mods[0]] > 0
        assert head[label > 0].all()
        for name in mods[2:]:
            volume = images[name]
            assert volume[label == 2].mean() > 1.3 * volume[head & (label == 0)].mean(), name
        # four distinct contrasts (T1ce is T1 plus enhancement, so those two correlate)
        flat = np.stack([v[head] for v in images.values()])
        assert np.abs(np.corrcoef(flat)[np.triu_indices(4, 1)]).max() < 0.99
        # contrasts differ: enhancing rim is brightest in the contrast-enhanced T1
        t1, t1ce = images[mods[0]], images[mods[1]]
        assert t1ce[label == et].mean() > 1.4 * t1[label == et].mean()
        # LPS-stored affine with ~200 mm field of view, slightly anisotropic
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        assert affine[0, 0] < 0 and affine[1, 1] < 0 and affine[2, 2] > 0
        assert np.allclose(spacing[:2], 200 / 32) and 1.0 <= spacing[2] / spacing[0] <= 1.15


def test_cli_writes_loadable_layout(tmp_path):
    assert data_main(["data", "synth", "--out", str(tmp_path), "--cases", "2", "--size", "20",
                      "--layout", "brats2023", "--seed", "3"]) == 0
    names = sorted(p.name for p in (tmp_path / "BraTS-GLI-00001-000").iterdir())
    assert names == [f"BraTS-GLI-00001-000-{m}.nii.gz" for m in
                     ("seg", "t1c", "t1n", "t2f", "t2w")]
    seg = nib.load(tmp_path / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-seg.nii.gz")
    assert seg.get_data_dtype() == np.uint8
    cfg = from_dict(DataConfig, {"root": str(tmp_path), "layout": "brats2023",
                                 "patch_size": [16, 16, 16]}, "data")
    data = build_transforms(cfg, "val")(load_cases(cfg)[1])
    assert data["image"].shape[0] == 4 and data["label"][1].sum() > 0
    # re-running with the same seed rewrites identical voxels
    before = seg.get_fdata()
    data_main(["data", "synth", "--out", str(tmp_path), "--cases", "2", "--size", "20",
               "--layout", "brats2023", "--seed", "3"])
    after = nib.load(tmp_path / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-seg.nii.gz")
    assert np.array_equal(before, after.get_fdata())
