"""lm-eval task configs for the local data (wikitext, blimp, xcopa); see `utils` for the loaders."""
