"""Data for APC: supervised splits of anomalib datamodules, CutPaste with real defects, demo data.

Layout, one job per module:

- :mod:`.mvtecad` (:class:`SupervisedMVTecAD`) and :mod:`.folder` (:class:`SupervisedFolder`): the
  datamodules, one per folder layout;
- :mod:`.split`: which anomalies move from test to training, and the batches that follow;
  :mod:`.split_arguments`: the split's arguments, declared once for both datamodules;
- :mod:`.sampler`: the balanced training draws; :mod:`.train_dataset`: the training set with CutPaste;
  :mod:`.basic_augmentation`: the paper's basic augmentations of every training draw, image and mask alike;
  :mod:`.seeded_kornia`: kornia's random draws made from a sample's own generator;
- :mod:`.image_files`: which files are images and how they are read; :mod:`.image_dataset`: anomalib's
  dataset with that reader; :mod:`.pairing`: masks paired with images by name; :mod:`.validation`:
  every file decoded once at set-up;
- :mod:`.annotations`: a mask, boxes or the label alone per anomaly; :mod:`.boxes`: YOLO and CSV box
  files; :mod:`.annotated_batch`: anomalib's training item and batch with the annotation;
- :mod:`.cutpaste`, :mod:`.cutpaste_grid`: CutPaste and a picture of it; :mod:`.demo`: the demo dataset.

Imports nothing else from this project but :mod:`anomalib_apc.errors`, so every other part can build on it.
"""

from anomalib_apc.data.cutpaste import CutPaste
from anomalib_apc.data.demo import make_demo_dataset
from anomalib_apc.data.folder import SupervisedFolder
from anomalib_apc.data.image_files import IMAGE_SUFFIXES, read_image
from anomalib_apc.data.mvtecad import SupervisedMVTecAD
from anomalib_apc.data.split import SPLIT_FILE_NAME, SupervisedSplitMixin, select_anomalies

__all__ = [
    "IMAGE_SUFFIXES",
    "SPLIT_FILE_NAME",
    "CutPaste",
    "SupervisedFolder",
    "SupervisedMVTecAD",
    "SupervisedSplitMixin",
    "make_demo_dataset",
    "read_image",
    "select_anomalies",
]
