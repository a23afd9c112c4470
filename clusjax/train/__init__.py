"""State, train step, optimizer, checkpointing and the loop."""
