"""The model/data contract: which datamodules say how many anomalies their training split holds."""

from anomalib_apc.contracts import NormalTrainingImagesSource, SplitCountsSource
from anomalib_apc.data import SupervisedMVTecAD
from anomalib_apc.models.apc.normal_images import training_anomaly_count


class _Counts:
    """Any object with ``split_counts()`` satisfies the contract; no base class needed."""

    def __init__(self, counts: dict[str, dict[str, int]]) -> None:
        self.counts = counts

    def split_counts(self) -> dict[str, dict[str, int]]:
        return self.counts


def test_training_anomaly_count_reads_the_training_split_only() -> None:
    assert training_anomaly_count(_Counts({"train": {"normal": 8, "anomalous": 0}, "test": {"anomalous": 5}})) == 0
    assert training_anomaly_count(_Counts({"train": {"normal": 8, "anomalous": 3}})) == 3
    assert training_anomaly_count(_Counts({"test": {"normal": 4, "anomalous": 5}})) is None
    assert training_anomaly_count(object()) is None
    assert training_anomaly_count(None) is None


def test_supervised_datamodules_satisfy_both_parts_of_the_contract(tiny_dataset) -> None:
    datamodule = SupervisedMVTecAD(root=tiny_dataset.root, category=tiny_dataset.category, num_anomalies=2,
                                   num_workers=0, seed=0)
    assert isinstance(datamodule, NormalTrainingImagesSource)
    assert isinstance(datamodule, SplitCountsSource)
    datamodule.setup()
    assert training_anomaly_count(datamodule) == 2
