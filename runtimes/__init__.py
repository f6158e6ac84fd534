"""Everything that executes a model (installed as kvcompile.runtimes)."""
