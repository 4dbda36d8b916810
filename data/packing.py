"""Concatenate token sequences and cut them into fixed-length windows, with a small, JSON-safe checkpoint state.

grain's ConcatThenSplitIterDataset keeps tuples in its state; Orbax stores iterator state as JSON, which turns
them into lists, and a restored iterator then yields different windows. This packer's state is the parent's
state before the current document plus an offset into it, so a restore re-reads one document and nothing else.
"""

import copy

import grain
import numpy as np


class PackedWindows(grain.IterDataset):
    """Windows of `length` consecutive tokens from the parent's 1-D int arrays, with no padding."""

    def __init__(self, parent: grain.IterDataset, length: int):
        super().__init__(parent)
        self._length = length

    def __iter__(self) -> grain.DatasetIterator:
        return _PackedWindowsIterator(self._parent.__iter__(), self._length)

    def __str__(self) -> str:
        return f"PackedWindows(length={self._length})"


class _PackedWindowsIterator(grain.DatasetIterator):

    def __init__(self, parent: grain.DatasetIterator, length: int):
        super().__init__(parent)
        self._length = length
        self._document_start = parent.get_state()
        self._document = np.zeros(0, np.int32)
        self._offset = 0

    def __next__(self) -> np.ndarray:
        pieces, needed = [], self._length
        while needed:
            if self._offset == len(self._document):
                self._document_start = self._parent.get_state()
                self._document, self._offset = next(self._parent), 0
            piece = self._document[self._offset:self._offset + needed]
            pieces.append(piece)
            self._offset += len(piece)
            needed -= len(piece)
        return np.concatenate(pieces)

    def get_state(self) -> dict:
        return {"document_start": copy.deepcopy(self._document_start), "offset": self._offset}

    def set_state(self, state: dict):
        self._document_start = copy.deepcopy(state["document_start"])
        self._parent.set_state(self._document_start)
        self._offset = state["offset"]
        # Offset 0 means the document was not started: the next call reads it from the parent anyway.
        self._document = next(self._parent) if self._offset else np.zeros(0, np.int32)
