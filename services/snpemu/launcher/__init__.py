"""The embedded launcher: the whole virtual host as local processes, no Docker needed."""
