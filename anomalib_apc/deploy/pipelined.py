"""Prediction with the CNN of later batches running while earlier ones are searched (OpenVINO ``AsyncInferQueue``).

``predict --throughput`` runs on it; it is kept apart from ``ApcInferencer``, whose ``predict``
scores one batch at a time.
"""

import threading
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np
import openvino as ov
import torch
from anomalib.data import ImageBatch

from .images import ImageInput
from .inferencer import ApcInferencer, PreparedImages, graph_input, image_batch


def predict_pipelined(
    inferencer: ApcInferencer, batches: Iterable[list[ImageInput]], jobs: int = 0,
) -> Iterator[ImageBatch | Exception]:
    """``predict`` of each batch, in order, with the CNN of later batches running while earlier ones are searched.

    The graph runs in an OpenVINO ``AsyncInferQueue`` of ``jobs`` requests (0: as many as the compiled
    graph finds optimal), the search, scoring and post-processing in this thread. A batch that
    cannot be read or pre-processed gives its exception in its place instead of stopping the run.
    """
    queue = ov.AsyncInferQueue(inferencer.graph, jobs)
    outputs: dict[int, dict[str, np.ndarray]] = {}
    finished: dict[int, threading.Event] = {}

    def store(request: ov.InferRequest, index: int) -> None:
        outputs[index] = {output.get_any_name(): request.get_tensor(output).data.copy()
                          for output in inferencer.graph.outputs}
        finished[index].set()

    queue.set_callback(store)
    pending: deque[tuple[int, PreparedImages | Exception]] = deque()

    def finish() -> ImageBatch | Exception:
        index, prepared = pending.popleft()
        if isinstance(prepared, Exception):
            return prepared
        finished[index].wait()
        with torch.no_grad():
            result = inferencer.post_process(inferencer.score_graph_outputs(outputs.pop(index)))
        return image_batch(prepared, result)

    for index, batch in enumerate(batches):
        try:
            prepared: PreparedImages | Exception = inferencer.prepare(batch)
        except Exception as error:  # reported in its batch's place; the other batches go on
            prepared = error
        else:
            finished[index] = threading.Event()
            queue.start_async(graph_input(prepared.model_inputs), index)
        pending.append((index, prepared))
        while len(pending) > max(1, len(queue)):
            yield finish()
    while pending:
        yield finish()


