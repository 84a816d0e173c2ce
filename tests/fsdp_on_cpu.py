"""Run a script under accelerate's FSDP path on CPU processes (tests only).

accelerate 1.x enables FSDP only on accelerators: launched on CPU processes, `recipes/accelerate/fsdp.yaml`
becomes plain data parallel (which `PicoTrainer` refuses). FSDP2 itself (torch's `fully_shard`) runs on
CPU with gloo, so for the slow suite this wrapper lets accelerate choose FSDP as it would on GPUs: the
distributed type it read from the environment is set to multi-GPU just before the Trainer creates its
Accelerator, whose FSDP plugin then comes from the launch config. Everything after that is the product's
own FSDP path (sharding, checkpoint gathering, optimizer state, resume) on `cpu` devices.

    python -m accelerate.commands.launch --config_file recipes/accelerate/fsdp.yaml --num_processes 2 \\
        tests/fsdp_on_cpu.py recipes/train.py [overrides ...]

With PICO_TEST_SIGKILL_AFTER_STEP=N in the environment, rank 0 is killed with SIGKILL when step N ends.
"""

import os
import runpy
import signal
import sys

import transformers
from accelerate.state import PartialState
from accelerate.utils import DistributedType

KILL_AFTER_STEP = "PICO_TEST_SIGKILL_AFTER_STEP"  # set: rank 0 is killed when this optimizer step ends
_create_accelerator = transformers.Trainer.create_accelerator_and_postprocess
_train = transformers.Trainer.train


def create_accelerator_as_on_gpus(self) -> None:
    if PartialState().distributed_type == DistributedType.MULTI_CPU:
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU  # private: tests only
    _create_accelerator(self)
    assert self.is_fsdp_enabled, "accelerate did not enable FSDP"


def train(self, *args, **kwargs):
    if KILL_AFTER_STEP in os.environ:
        self.add_callback(SigkillAfterStep(int(os.environ[KILL_AFTER_STEP])))
    return _train(self, *args, **kwargs)


class SigkillAfterStep(transformers.TrainerCallback):
    """Rank 0 dies by SIGKILL when optimizer step N ends, as a crashed node would (torchrun then stops the rest)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and state.is_world_process_zero:
            os.kill(os.getpid(), signal.SIGKILL)


transformers.Trainer.create_accelerator_and_postprocess = create_accelerator_as_on_gpus
transformers.Trainer.train = train

if __name__ == "__main__":
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
