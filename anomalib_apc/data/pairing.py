"""Which mask belongs to which anomalous image: paired by name, never by sort order.

anomalib pairs the sorted anomalous images with the sorted masks position by position and then only
checks that each image's stem occurs in its mask's stem. Folders that sort differently
(``bad/{scratch,dent}`` with ``masks/{1_scratch,2_dent}``) then give ``dent/001.png`` the mask
``1_scratch/001_mask.png`` without a word, and names that are not zero-padded (``1.png`` ..
``12.png``) fail with a ``MisMatchError`` naming no file. Here the rule is:

- The key of a file is its path relative to its folder, without the suffix and without a trailing
  ``_mask``: ``dent/001.png`` and ``dent/001_mask.png`` both have the key ``dent/001``. An image
  and a mask pair when their keys are equal; the suffixes may differ (``001.jpg``, ``001_mask.png``).
- When an image folder or a mask folder has no sub-folders, the key is the file name alone
  (``001``), so a flat mask folder can serve an image folder with sub-folders and vice versa.
- Given as many mask folders as image folders, the i-th image folder takes its masks from the i-th
  mask folder only (``abnormal_dir=["bad/scratch", "bad/dent"]`` with
  ``mask_dir=["masks/1_scratch", "masks/2_dent"]``); otherwise all masks serve all images.

Two images or two masks with the same key are ambiguous, an image without a mask (unless it has
boxes, see :mod:`.annotations`) and a mask without an image are missing: both are errors naming the files.
"""

from collections.abc import Collection, Sequence
from pathlib import Path

from anomalib_apc.data.messages import bulleted
from anomalib_apc.errors import InvalidInputError, MissingInputError

FolderFiles = tuple[Path, Sequence[Path]]
"""A folder and the files found in it (or in its sub-folders)."""


def pair_masks(
    images: Sequence[FolderFiles], masks: Sequence[FolderFiles], where: str, may_lack_mask: Collection[Path] = ()
) -> dict[Path, Path]:
    """The mask of every anomalous image, paired by name (see the module docstring for the rule).

    Args:
        images: The anomalous image folders, each with its image files.
        masks: The mask folders, each with its mask files.
        where: The dataset, for the error messages.
        may_lack_mask: Images annotated otherwise (by boxes): without a mask they are left out of
            the result instead of being an error.

    Raises:
        InvalidInputError: Two images or two masks have the same key; the message names them.
        MissingInputError: An image has no mask or a mask no image; the message names them.
    """
    if len(images) == len(masks):
        groups = [([one_images], [one_masks]) for one_images, one_masks in zip(images, masks, strict=True)]
    else:
        groups = [(list(images), list(masks))]
    images_by_key: dict[tuple[int, str], list[Path]] = {}
    masks_by_key: dict[tuple[int, str], list[Path]] = {}
    for index, (image_folders, mask_folders) in enumerate(groups):
        by_relative_path = all(_has_sub_folders(folder, files) for folder, files in image_folders + mask_folders)
        for folders, by_key in ((image_folders, images_by_key), (mask_folders, masks_by_key)):
            for folder, files in folders:
                for path in files:
                    by_key.setdefault((index, _key(path, folder, by_relative_path)), []).append(path)

    ambiguous = [
        f"{kind} {', '.join(map(str, paths))} have the same name key {key!r}"
        for kind, by_key in (("images", images_by_key), ("masks", masks_by_key))
        for (_, key), paths in by_key.items()
        if len(paths) > 1
    ]
    if ambiguous:
        msg = f"{where}: masks are paired with images by name, and these names are ambiguous:\n" + bulleted(ambiguous)
        raise InvalidInputError(msg)
    missing = [
        f"anomalous image {paths[0]} has no mask (nor boxes)"
        for key, paths in images_by_key.items()
        if key not in masks_by_key and paths[0] not in may_lack_mask
    ]
    missing += [
        f"mask {paths[0]} has no anomalous image" for key, paths in masks_by_key.items() if key not in images_by_key
    ]
    if missing:
        msg = (
            f"{where}: every anomalous image needs a mask of the same name (x.png with x.png or x_mask.png, "
            "in a folder of the same name when there are sub-folders), or boxes; with no mask at all, anomalous "
            "images are known by their label alone:\n" + bulleted(missing)
        )
        raise MissingInputError(msg)
    return {paths[0]: masks_by_key[key][0] for key, paths in images_by_key.items() if key in masks_by_key}


def _has_sub_folders(folder: Path, files: Sequence[Path]) -> bool:
    return any(len(path.relative_to(folder).parts) > 1 for path in files)


def _key(path: Path, folder: Path, by_relative_path: bool) -> str:
    relative = path.relative_to(folder) if by_relative_path else Path(path.name)
    return relative.with_suffix("").as_posix().removesuffix("_mask")
