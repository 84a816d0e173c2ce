"""Kill rank 0 mid-run, as a crashed node would (tests only): imported by the launch wrappers in tests/.

With PICO_TEST_SIGKILL_AFTER_STEP=N in the environment, rank 0 is killed with SIGKILL when optimizer step N
ends (the launcher then stops the other processes).
"""

import os
import signal

import transformers

KILL_AFTER_STEP = "PICO_TEST_SIGKILL_AFTER_STEP"
_train = transformers.Trainer.train


class SigkillAfterStep(transformers.TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and state.is_world_process_zero:
            os.kill(os.getpid(), signal.SIGKILL)


def train(self, *args, **kwargs):
    if KILL_AFTER_STEP in os.environ:
        self.add_callback(SigkillAfterStep(int(os.environ[KILL_AFTER_STEP])))
    return _train(self, *args, **kwargs)


transformers.Trainer.train = train
