"""The `offload` command line's subcommands: one module each (`generate`, `profile`, `bench`), plus `common`."""
