"""`python tests/support/fsdp_on_cpu.py ARGS` = `flux2-lora ARGS`, with FSDP2 usable on CPU processes (tests only).

accelerate applies an FSDP plugin only when its distributed type is MULTI_GPU (or another accelerator); on
CPU processes it always wraps in DDP. Setting that type on a gloo PartialState before the trainer builds its
Accelerator makes `prepare()` run accelerate's own `fsdp2_prepare_model`, the code path GPUs take. This
relies on an accelerate detail (checked with accelerate 1.15), so it lives in the tests, not the package.
Start it under `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N`.
"""

import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType

if __name__ == "__main__":
    state = PartialState(cpu=True, backend="gloo")
    state.distributed_type = DistributedType.MULTI_GPU
    from flux2_lora.cli import main

    sys.exit(main(sys.argv[1:]))
