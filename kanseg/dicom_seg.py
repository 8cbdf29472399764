"""DICOM-SEG output for DICOM series input, made with highdicom.

``kanseg infer`` takes a folder holding one DICOM series (or ``FOLDER#SeriesInstanceUID``, one
series of a folder holding several) as a case: SimpleITK converts it to NIfTI
(:func:`dicom_as_nifti`), it is predicted like any NIfTI case, and its label map is
written both as ``<id>.nii.gz`` and as a DICOM Segmentation object ``<id>.seg.dcm``
(:func:`write_dicom_seg`): one segment per non-background label value of the run's config,
named from the config, one frame per source slice that holds a segment, each referencing
its source image, and the algorithm identified as ``kanseg <model name>``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kanseg import __version__
from kanseg.data.convert import convert_to_nifti, dicom_series_files
from kanseg.data.layouts import label_spec
from kanseg.files import atomic_write

SEG_SUFFIX = ".seg.dcm"


def is_dicom_series(folder: Path) -> bool:
    """Whether ``folder`` holds at least one DICOM series (GDCM's scan of its files)."""
    import SimpleITK as sitk

    return folder.is_dir() and bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def dicom_as_nifti(case: dict, work: Path) -> dict:
    """``case`` with its DICOM series (folder ``case["dicom"]``, series ``case["series"]``)
    converted to ``work/<id>.nii.gz`` as its image; a case without ``"dicom"`` is returned as
    it is."""
    if "dicom" not in case:
        return case
    nifti = convert_to_nifti(case["dicom"], work / f"{case['id']}.nii.gz", case.get("series"))
    return {**case, "image": str(nifti)}


def segment_labels(data_cfg: Any) -> list[tuple[int, str]]:
    """``(raw value, name)`` of every non-background label value a prediction can hold: the
    name of the class (or single-value region) with that value, else ``label <value>``."""
    from kanseg.evaluation import labels_for

    names = {lb.values[0]: lb.name for lb in labels_for(data_cfg) if len(lb.values) == 1}
    values = sorted(label_spec(data_cfg).allowed_values - {0})
    return [(v, names.get(v, f"label {v}")) for v in values]


def _descriptions(segments: Sequence[tuple[int, str]], algorithm: str) -> list:
    """highdicom segment descriptions (generic SNOMED "Tissue" codes), automatic, by
    ``algorithm``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algo = hd.AlgorithmIdentificationSequence(
        name=algorithm, version=__version__, family=codes.cid7162.ArtificialIntelligence)
    return [hd.seg.SegmentDescription(
        segment_number=i, segment_label=name, segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algo) for i, (_, name) in enumerate(segments, 1)]


def _read_source(path: str) -> Any:
    """A source slice; an empty SOP Class / Instance UID (some anonymisers blank them) is
    taken from the file meta, whose Media Storage UIDs the DICOM standard makes the same."""
    import pydicom

    ds = pydicom.dcmread(path)
    for tag in ("SOPClassUID", "SOPInstanceUID"):
        if not ds.get(tag):
            setattr(ds, tag, ds.file_meta.get(f"MediaStorage{tag}"))
    return ds


def write_dicom_seg(labels: np.ndarray, series: str | Path, path: str | Path,
                    segments: Sequence[tuple[int, str]], algorithm: str,
                    series_id: str | None = None) -> Path:
    """Write ``labels`` (raw label values, ``(x, y, z)`` on the grid SimpleITK reads the
    DICOM series folder ``series`` into; its series ``series_id`` when it holds several) as a
    DICOM-SEG at ``path``, atomically.

    Segment ``i`` holds the voxels of ``segments[i - 1]``'s raw value; the SEG joins the
    source series' study and frame of reference and references each source slice."""
    import highdicom as hd

    files = dicom_series_files(series, series_id)
    sources = [_read_source(f) for f in files]
    frames = np.transpose(labels, (2, 1, 0))  # (slices in file order, rows, columns)
    expected = (len(files), int(sources[0].Rows), int(sources[0].Columns))
    if frames.shape != expected:
        raise ValueError(f"{path}: label map of shape {labels.shape} does not fit DICOM series "
                         f"{series} ({expected[2]} columns x {expected[1]} rows x "
                         f"{expected[0]} slices)")
    unknown = sorted(set(np.unique(frames).tolist()) - {0} - {v for v, _ in segments})
    if unknown:
        raise ValueError(f"{path}: label values {unknown} have no segment; segments: "
                         f"{[v for v, _ in segments]}")
    numbers = np.zeros(frames.shape, np.uint16)
    for i, (value, _) in enumerate(segments, 1):
        numbers[frames == value] = i
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=numbers,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=_descriptions(segments, algorithm),
            series_instance_uid=hd.UID(), series_number=int(sources[0].get("SeriesNumber") or 0)
            + 1000, sop_instance_uid=hd.UID(), instance_number=1, manufacturer="kanseg",
            manufacturer_model_name=algorithm, software_versions=__version__,
            device_serial_number="0", series_description=f"{algorithm} segmentation")
    except (AttributeError, KeyError, ValueError, TypeError) as err:  # a needed tag is missing
        raise ValueError(f"cannot make a DICOM-SEG for series {series}: {err}") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, seg.save_as, ".dcm")
    return path
