"""Ctrl-C and SIGTERM during a training run, as a job scheduler sends them: finish the step, checkpoint, exit.

StopSignals holds the protocol train.py's loop follows: the first signal lets the step finish, the caller
checkpoints and exits 128 + the signal (130, 143); a second one raises StopNow at once wherever the weights
are those of the last finished step, and at the end of an optimizer update under way, never inside it.
announcer is what a handler may print. Beyond the paper: a long run's plumbing (paper 2.4 gives the run, not
how it stops).

Imports os and signal only: nothing from the project. train.py imports this module.
"""
import os
import signal


class StopNow(BaseException):
    """A second Ctrl-C or SIGTERM, raised where the weights are those of `step`, the last finished step.
    Not an Exception: nothing on the way (the data loader, autograd) may catch it."""

    def __init__(self, step: int):
        super().__init__(step)
        self.step = step


class StopSignals:
    """Ctrl-C and SIGTERM during the loop, as a job scheduler sends them (to loader workers too: they ignore both).

    First: finish the step, checkpoint, exit 128 + the signal (130, 143: the shell's convention, so that
    `train.py ... && probe.py ...` does not probe a half-trained model). Second: stop now, with a checkpoint
    of the last finished step: StopNow is raised at once wherever the weights are that step's (the forward,
    the backward, the data), and at the end of an optimizer update that was under way (microseconds), never
    inside it.
    """

    def __init__(self, step: int, announce):
        self.signal, self.again, self.finished, self.announce = None, False, step, announce
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _on_signal(self, sig, frame):
        if self.signal is None:
            self.signal = sig
            self.announce(f"{signal.Signals(sig).name}: finishing this step, then checkpoint and exit "
                          f"(again: stop now, keeping the last finished step)")
        elif not self.again:
            self.again = True
            if self.finished is not None:
                raise StopNow(self.finished)

    def updating(self):
        """The optimizer is changing the weights: from here to reached(), no step's state is whole."""
        self.finished = None

    def reached(self, step: int):
        """The weights are those of `step`, finished."""
        self.finished = step
        if self.again:
            raise StopNow(step)

    @property
    def exit_code(self) -> int:
        return 128 + (self.signal or signal.SIGTERM)  # SIGTERM: a rank that only heard of another's signal

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def announcer(bar, rank: int):
    """What a signal handler may print: one write to stderr, never through Python's buffers (a handler can
    interrupt a write to them), on a line of its own below the bar."""
    def announce(text: str):
        if rank == 0:
            os.write(2, (("" if bar.disable else "\n") + text + "\n").encode())
    return announce
