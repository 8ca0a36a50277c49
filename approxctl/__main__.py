"""`python -m approxctl` (and `torchrun -m approxctl`) runs the command line."""

from approxctl.cli import main

main()
