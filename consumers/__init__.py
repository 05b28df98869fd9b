"""cachesync: event-driven cache invalidation and warming (imported as `cachesync.consumers`).

Where things happen:
- an event becomes commands in `mapping.mapper` (rules from `topology/`);
- a command becomes an effect in `sinks.<kind>` (contract in `sinks.base`, the CDN
  purge template in `sinks.cdn`);
- both run inside `pipeline.roles`, on the commit-after-effect loop of `pipeline.loop`;
- `ops` holds the operator tools (replay, trace, consistency, status, demo), `cli`
  the commands that call them.
"""
