"""`python -m grpo_core ...` is the same entry as the `grpo` console script (so torchrun -m works)."""
from grpo_core.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
