"""The streaming core: one async flow, several views of it.

    request ─► services.chat_start ─► manager.start ─► Generation.run ──► eventlog (append)
                                                          │                   │
                                      store (flushes, outcome, slot)     follow.follow_events
                                                                              │
                                        transports: SSE · NDJSON · JSON · WebSocket pump

- `events`: the event schema every transport carries; `outcome`: how an answer ended.
- `eventlog`: the log contract, its in-memory backend and `event_log_from_settings()`;
  `eventlog_redis`: Redis Streams for a cluster.
- `generation`: one answer being written; `manager`: the process's generations (start,
  stop, drain, heartbeat, orphan sweep); `store`: their database writes; `tasks`.
- `follow`: reading an answer from an offset to its one terminal event, whatever fails.
- `transports`: the framings of that one iterator.
"""
