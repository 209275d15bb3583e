"""Analysis of finished runs: paired statistics (stats), per-prompt comparisons in three views (paired)."""
