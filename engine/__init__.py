"""Ferry's engine: tasks, transports, replication, platform. Never imports textual."""
