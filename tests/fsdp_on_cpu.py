"""Run a script under accelerate's FSDP path on CPU processes (tests only).

accelerate 1.x enables FSDP only on accelerators: launched on CPU processes, `recipes/accelerate/fsdp.yaml`
becomes plain data parallel (which `PicoTrainer` refuses). FSDP2 itself (torch's `fully_shard`) runs on
CPU with gloo, so for the slow suite this wrapper lets accelerate choose FSDP as it would on GPUs: the
distributed type it read from the environment is set to multi-GPU just before the Trainer creates its
Accelerator, whose FSDP plugin then comes from the launch config. Everything after that is the product's
own FSDP path (sharding, checkpoint gathering, optimizer state, resume) on `cpu` devices.

    python -m accelerate.commands.launch --config_file recipes/accelerate/fsdp.yaml --num_processes 2 \\
        tests/fsdp_on_cpu.py recipes/train.py [overrides ...]

With PICO_TEST_SIGKILL_AFTER_STEP=N in the environment, rank 0 is killed with SIGKILL when step N ends
(tests/sigkill.py).
"""

import runpy
import sys

import sigkill  # noqa: F401  (PICO_TEST_SIGKILL_AFTER_STEP)
import transformers
from accelerate.state import PartialState
from accelerate.utils import DistributedType

_create_accelerator = transformers.Trainer.create_accelerator_and_postprocess


def create_accelerator_as_on_gpus(self) -> None:
    if PartialState().distributed_type == DistributedType.MULTI_CPU:
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU  # private: tests only
    _create_accelerator(self)
    assert self.is_fsdp_enabled, "accelerate did not enable FSDP"


transformers.Trainer.create_accelerator_and_postprocess = create_accelerator_as_on_gpus

if __name__ == "__main__":
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
