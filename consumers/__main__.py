"""`python -m cachesync.consumers` is the `cachesync` command."""

from cachesync.consumers.cli.app import main

main()
