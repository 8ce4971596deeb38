"""Joining the memory bank's row chunks without holding them twice (plain PyTorch)."""

import torch


def concatenate_releasing(chunks: list[torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
    """Concatenate row chunks, emptying ``chunks`` as it goes.

    ``torch.cat`` holds every chunk and the result at once: twice the memory bank's patches, several
    GB at real data sizes. Copying chunk by chunk into the result while dropping each chunk keeps
    the peak at the result plus one chunk.

    Args:
        chunks: Tensors with the same trailing shape; the list is empty afterwards.
        device: Device of the empty result when there are no chunks (otherwise the chunks' device).
    """
    if not chunks:
        return torch.empty(0, device=device)
    result = chunks[0].new_empty((sum(len(chunk) for chunk in chunks), *chunks[0].shape[1:]))
    offset = 0
    chunks.reverse()
    while chunks:
        chunk = chunks.pop()
        result[offset : offset + len(chunk)] = chunk
        offset += len(chunk)
    return result
