"""cachesync: event-driven cache invalidation and warming.

Where things happen:
- an event becomes commands in `cachesync.consumers.mapping.mapper` (rules from `topology/`);
- a command becomes an effect in `cachesync.consumers.sinks.<kind>` (contract in `sinks/base`);
- both run inside `cachesync.consumers.pipeline.roles`, on the commit-after-effect loop of `cachesync.consumers.pipeline.kafka`.
"""
