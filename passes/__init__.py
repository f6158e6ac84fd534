"""Graph analyses and rewrites (installed as kvcompile.passes)."""
