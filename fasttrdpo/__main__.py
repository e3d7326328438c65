"""`python -m fasttrdpo train|eval` (and `torchrun --nproc_per_node N -m fasttrdpo train` for DDP)."""
import sys

from .cli import main

sys.exit(main())
