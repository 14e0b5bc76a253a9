"""train() in a second process, beside a training in this one.

The build trains the no-distillation baseline this way, on one core, while the
distilled student trains on the other: a 2-core machine then runs both students
in the time of one single-threaded run instead of two two-threaded ones one
after the other (two threads on these small matrices are far from twice one).
Each run is single-threaded, so each is deterministic for its seed.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from tierline.build.train import TrainConfig
from tierline_shared.models.configs import DecoderConfig
from tierline_shared.models.llama import Decoder, load_decoder

POLL_S = 1.0  # how often wait() checks that the process is still alive


def _run(model_cfg: DecoderConfig, state: dict, cfg: TrainConfig, levels: tuple[int, ...], threads: int,
         out_dir: str, messages) -> None:
    """The child process: train a copy of the model, write its weights, report the summary."""
    from tierline.build.train import train
    from tierline_shared.models.llama import save_decoder
    from tierline_shared.models.tokenizer import TextTokenizer

    try:
        torch.set_num_threads(threads)
        model = Decoder(model_cfg)
        model.load_state_dict(state)
        summary = train(model, TextTokenizer.default(), cfg, levels=levels,
                        progress=lambda step, loss: messages.put(("step", step, loss)))
        save_decoder(model, out_dir)
        messages.put(("done", summary))
    except Exception as exc:  # the parent raises it with this text
        messages.put(("error", f"{type(exc).__name__}: {exc}"))


class BackgroundTrain:
    """Trains `model` (in place, once wait() returns) in a spawned process with `threads` threads.

    No teacher: the child trains on hard labels only (distill_alpha must be 0).
    `on_step(step, loss)` is called from poll() and wait() for each step the child reports.
    """

    def __init__(self, model: Decoder, cfg: TrainConfig, levels: tuple[int, ...], threads: int, work: Path,
                 on_step: Callable[[int, float], None]):
        if cfg.distill_alpha > 0:
            raise ValueError("a background training has no teacher: distill_alpha must be 0")
        ctx = mp.get_context("spawn")  # no fork of a process that holds torch's thread pools
        self._messages = ctx.Queue()
        self._model, self._on_step = model, on_step
        self._dir = Path(work) / "background-train"
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._proc = ctx.Process(target=_run, args=(model.cfg, state, cfg, levels, threads, str(self._dir),
                                                    self._messages), daemon=True)
        self._started = time.perf_counter()
        self._proc.start()
        self.summary: dict | None = None
        self.seconds: float | None = None  # wall time from the start to the child's result

    def _handle(self, msg: tuple) -> None:
        if msg[0] == "step":
            self._on_step(msg[1], msg[2])
        elif msg[0] == "done":
            self.summary = msg[1]
            self.seconds = time.perf_counter() - self._started
        else:
            raise RuntimeError(f"background training failed: {msg[1]}")

    def poll(self) -> None:
        """Handle what the child reported so far, without waiting."""
        while self.summary is None:
            try:
                msg = self._messages.get_nowait()
            except queue.Empty:
                return
            self._handle(msg)

    def wait(self) -> dict:
        """Block until the child is done; load its weights into the model; return train()'s summary."""
        while self.summary is None:
            try:
                msg = self._messages.get(timeout=POLL_S)
            except queue.Empty:
                if not self._proc.is_alive():
                    raise RuntimeError(f"background training exited (code {self._proc.exitcode}) "
                                       "before it reported a result") from None
                continue
            self._handle(msg)
        self._proc.join()
        self._model.load_state_dict(load_decoder(self._dir).state_dict())
        self._model.eval()
        shutil.rmtree(self._dir)
        return self.summary

    def close(self) -> None:
        """Stop the child if it still runs (after an error in the parent)."""
        if self._proc.is_alive():
            self._proc.terminate()
        self._proc.join()
