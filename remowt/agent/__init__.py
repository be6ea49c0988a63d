"""The agent: the program remowt starts on the target."""
