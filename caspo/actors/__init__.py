"""Long-lived Ray actors: generator pool, confidence scorer, critic, pair store, registry."""
