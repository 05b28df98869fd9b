"""`python -m consumers` is the `cachesync` command."""

from consumers.cli import main

main()
