r"""Save a grid picture of CutPaste training samples, to check by eye what the model trains on.

The samples come from the real training path (``SupervisedMVTecAD.train_dataloader`` with
``cutpaste_probability=1``, so every anomalous draw is a CutPaste anomaly); the red outline is the
sample's ground-truth mask, the pasted region.

Usage::

    # MPDD metal_plate
    python -m anomalib_apc.data.cutpaste_grid --root ../shared/datasets/mpdd --category metal_plate \\
        --output cutpaste_grid.png
    # without --root: on the demo dataset, written to a temporary folder
    python -m anomalib_apc.data.cutpaste_grid --output cutpaste_grid.png
"""

import argparse
import logging
import tempfile
from pathlib import Path

from matplotlib.figure import Figure

from anomalib_apc.data.demo import make_demo_dataset
from anomalib_apc.data.mvtecad import SupervisedMVTecAD
from anomalib_apc.errors import ApcError, InvalidInputError

logger = logging.getLogger(__name__)


def save_cutpaste_grid(
    root: str | Path,
    category: str,
    output: str | Path,
    rows: int = 3,
    columns: int = 4,
    num_anomalies: int = 10,
    seed: int = 0,
) -> Path:
    """Draw ``rows * columns`` CutPaste samples of a category in MVTec AD layout and save them to ``output``.

    Raises:
        InvalidInputError: ``num_anomalies``, ``rows`` or ``columns`` is below 1 (CutPaste samples need
            training anomalies to cut from, and a grid needs a cell).
    """
    if num_anomalies < 1:
        msg = (
            f"save_cutpaste_grid: num_anomalies (--num-anomalies) must be 1 or more, got {num_anomalies}: "
            "CutPaste samples are cut from the real anomalies moved to training."
        )
        raise InvalidInputError(msg)
    if rows < 1 or columns < 1:
        msg = f"save_cutpaste_grid: rows and columns must be 1 or more, got rows={rows}, columns={columns}."
        raise InvalidInputError(msg)
    datamodule = SupervisedMVTecAD(
        root=root,
        category=category,
        num_anomalies=num_anomalies,
        cutpaste_probability=1.0,
        train_batch_size=rows * columns,
        num_workers=0,
        seed=seed,
    )
    datamodule.setup()
    samples = []
    while len(samples) < rows * columns:
        for batch in datamodule.train_dataloader():
            anomalous = batch.gt_label
            samples += list(zip(batch.image[anomalous], batch.gt_mask[anomalous], strict=True))

    figure = Figure(figsize=(3 * columns, 3 * rows), layout="constrained")
    for axis, (image, mask) in zip(figure.subplots(rows, columns).flat, samples, strict=False):
        axis.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
        axis.contour(mask.numpy().astype(float), levels=[0.5], colors="red", linewidths=0.8)
        axis.set_axis_off()
    figure.suptitle(f"CutPaste samples, {category}: pasted region outlined in red")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100)
    return output


def main() -> None:
    """Command line entry, see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, help="dataset root in MVTec AD layout (default: demo data)")
    parser.add_argument("--category", default=None, help="category folder (default: metal_plate, or demo)")
    parser.add_argument("--output", type=Path, default=Path("cutpaste_grid.png"))
    parser.add_argument("--rows", type=int, default=3)
    parser.add_argument("--columns", type=int, default=4)
    parser.add_argument("--num-anomalies", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    with tempfile.TemporaryDirectory() as scratch:
        root, category = arguments.root, arguments.category
        if root is None:
            root, category = Path(scratch), category or "demo"
            make_demo_dataset(root, seed=arguments.seed, category=category)
        try:
            output = save_cutpaste_grid(
                root,
                category or "metal_plate",
                arguments.output,
                rows=arguments.rows,
                columns=arguments.columns,
                num_anomalies=arguments.num_anomalies,
                seed=arguments.seed,
            )
        except ApcError as error:
            parser.exit(2, f"error: {error}\n")
    print(output)


if __name__ == "__main__":
    main()
