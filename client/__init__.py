"""The client process: join, catch up, train locally, submit."""
