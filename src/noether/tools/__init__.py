"""Tools that inspect a run after (or while) it trains: checkpoints and plots."""
