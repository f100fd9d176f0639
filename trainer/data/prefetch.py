"""The next batches made on a background thread while the current step computes.

Tokenizing and packing run in Python; torch's kernels release the GIL, so a thread overlaps them with
the step at no cost in memory beyond `depth` batches. The data position saved in a checkpoint is that of
the batches the training loop has taken, not of those made ahead: each batch comes with the loader's
state just after it, and a restore stops the thread, drops what it made, and starts it again from the
restored position. Exact resume is untouched.
"""

import queue
import threading


from trainer.data.loader import Batch, PackedLoader


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class PrefetchingLoader:
    """A PackedLoader's interface (next_batch, last_ids, state_dict, load_state_dict), `depth` batches ahead."""

    def __init__(self, loader: PackedLoader, depth: int):
        self.loader, self.depth = loader, depth
        self.last_ids: list[tuple[int, int]] = []
        self._state = loader.state_dict()  # the position after the last batch taken
        self._thread: threading.Thread | None = None
        self._start()

    def _start(self) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=self.depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="tessera-data", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                batch = self.loader.next_batch()
                self._put((batch, list(self.loader.last_ids), self.loader.state_dict()))
        except BaseException as error:  # handed to the training thread, which raises it
            self._put(_Failure(error))

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def next_batch(self) -> Batch:
        item = self._queue.get()
        if isinstance(item, _Failure):
            raise item.error
        batch, self.last_ids, self._state = item
        return batch

    def state_dict(self) -> dict:
        return self._state

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.loader.load_state_dict(state)
        self._state = self.loader.state_dict()
        self._start()

    def close(self) -> None:
        """Stops the thread (the batches it made are dropped)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
