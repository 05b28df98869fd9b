"""cachesync: event-driven cache invalidation and warming.

Where things happen:
- an event becomes commands in `consumers.mapper` (rules from `topology/`);
- a command becomes an effect in `consumers.sinks.<kind>` (contract in `sinks/base`);
- both run inside `consumers.roles`, on the commit-after-effect loop of `consumers.kafka`.
"""
