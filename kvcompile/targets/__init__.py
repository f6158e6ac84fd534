"""Back ends: each module lowers the rewritten model for one target and writes its artifacts."""
