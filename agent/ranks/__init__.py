"""A node's rank processes: the pure rules of a rank's life (lifecycle.py), the supervisor that
applies them (supervisor.py), and the I/O around it (spawn, shim, watch, state_dir, logs, cgroups,
owned_dirs). See ARCHITECTURE.md."""
